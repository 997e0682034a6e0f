//! LZ4 block format (lz4.org's lz4_Block_format.md): sequences of literals then a match
//! (2-byte offset back into the output, length 4 and up). The loader decodes with
//! [`decompress`]; the build script compresses with [`compress`] (hash chains with lazy
//! matching, about `lz4 -9`'s ratio) and checks that the result decodes to the same bytes.
//! LZ4 rather than zstd: a third larger (1.43 against 1.09 MB for the 2.7 MB runtime) but
//! unpacked 5x faster (3.4 against 0.7 GB/s), so the loader costs about a millisecond per
//! start instead of four or five, and needs no C library.

/// A match never starts closer than this to the end, and the last bytes are literals (the
/// format's end rules, which let decoders copy in wide steps).
#[cfg(not(ovl_loader))]
const LAST_LITERALS: usize = 5;
#[cfg(not(ovl_loader))]
const MF_LIMIT: usize = 12;
const MIN_MATCH: usize = 4;
#[cfg(not(ovl_loader))]
const MAX_OFFSET: usize = 65535;

/// Decodes the block `src` into `dst`, which must be exactly its decoded size. Returns false
/// if the block is damaged (it then never reads or writes outside the slices).
pub fn decompress(src: &[u8], dst: &mut [u8]) -> bool {
    let (mut i, mut o) = (0usize, 0usize);
    loop {
        let Some(&token) = src.get(i) else {
            return false;
        };
        i += 1;
        let mut lit = (token >> 4) as usize;
        if lit == 15 {
            match read_len(src, &mut i) {
                Some(n) => lit += n,
                None => return false,
            }
        }
        if lit <= 16 && i + 16 <= src.len() && o + 16 <= dst.len() {
            // Short literals: one fixed-size copy, past the end of the run.
            dst[o..o + 16].copy_from_slice(&src[i..i + 16]);
        } else {
            let (Some(s), Some(d)) = (src.get(i..i + lit), dst.get_mut(o..o + lit)) else {
                return false;
            };
            d.copy_from_slice(s);
        }
        i += lit;
        o += lit;
        if i == src.len() {
            return o == dst.len();
        }
        let Some(off) = src.get(i..i + 2) else {
            return false;
        };
        let off = u16::from_le_bytes([off[0], off[1]]) as usize;
        i += 2;
        let mut len = (token & 15) as usize + MIN_MATCH;
        if len == 15 + MIN_MATCH {
            match read_len(src, &mut i) {
                Some(n) => len += n,
                None => return false,
            }
        }
        if off == 0 || off > o || len > dst.len() - o {
            return false;
        }
        let from = o - off;
        let step = if off >= 16 { 16 } else { 8 };
        if off >= 8 && o + len + 16 <= dst.len() {
            // Wide steps past the end of the match, each reading only bytes already written
            // (step <= off) and staying inside `dst` (the 16 bytes of room checked above).
            let d = dst.as_mut_ptr();
            let mut k = 0;
            while k < len {
                unsafe {
                    if step == 16 {
                        core::ptr::copy_nonoverlapping(d.add(from + k), d.add(o + k), 16);
                    } else {
                        core::ptr::copy_nonoverlapping(d.add(from + k), d.add(o + k), 8);
                    }
                }
                k += step;
            }
        } else {
            for k in 0..len {
                dst[o + k] = dst[from + k];
            }
        }
        o += len;
    }
}

/// A length's continuation: bytes added up to one below 255.
fn read_len(src: &[u8], i: &mut usize) -> Option<usize> {
    let mut n = 0usize;
    loop {
        let b = *src.get(*i)?;
        *i += 1;
        n += b as usize;
        if b != 255 {
            return Some(n);
        }
    }
}

/// Compresses `src` into one LZ4 block (the build script's half: it has std).
#[cfg(not(ovl_loader))]
pub fn compress(src: &[u8]) -> Vec<u8> {
    const HASH_BITS: u32 = 17;
    const DEPTH: usize = 256;
    let n = src.len();
    let mut out = Vec::with_capacity(n / 2);
    let mut head = vec![u32::MAX; 1 << HASH_BITS];
    let mut prev = vec![u32::MAX; n];
    let read32 = |p: usize| u32::from_le_bytes(src[p..p + 4].try_into().unwrap());
    let hash = |p: usize| (read32(p).wrapping_mul(2654435761) >> (32 - HASH_BITS)) as usize;
    // The longest match for position p among earlier positions, (length, offset).
    let best = |head: &[u32], prev: &[u32], p: usize| -> (usize, usize) {
        let limit = n - LAST_LITERALS;
        let (mut len, mut off) = (0, 0);
        let mut c = head[hash(p)];
        for _ in 0..DEPTH {
            if c == u32::MAX || p - c as usize > MAX_OFFSET {
                break;
            }
            let c0 = c as usize;
            if src[c0 + len.min(limit - p - 1)] == src[p + len.min(limit - p - 1)] {
                let mut l = 0;
                while p + l < limit && src[c0 + l] == src[p + l] {
                    l += 1;
                }
                if l > len {
                    (len, off) = (l, p - c0);
                }
            }
            c = prev[c0];
        }
        (len, off)
    };
    let insert = |head: &mut [u32], prev: &mut [u32], p: usize| {
        let h = hash(p);
        prev[p] = head[h];
        head[h] = p as u32;
    };
    let (mut p, mut anchor, mut inserted) = (0usize, 0usize, 0usize);
    while p + MF_LIMIT < n {
        while inserted < p {
            insert(&mut head, &mut prev, inserted);
            inserted += 1;
        }
        let (mut len, mut off) = best(&head, &prev, p);
        if len < MIN_MATCH {
            p += 1;
            continue;
        }
        // Lazy: a longer match one byte on is worth a literal.
        while p + 1 + MF_LIMIT < n {
            insert(&mut head, &mut prev, p);
            inserted = p + 1;
            let (l2, o2) = best(&head, &prev, p + 1);
            if l2 <= len {
                break;
            }
            (p, len, off) = (p + 1, l2, o2);
        }
        emit(&mut out, &src[anchor..p], Some((off, len)));
        p += len;
        anchor = p;
    }
    emit(&mut out, &src[anchor..], None);
    out
}

#[cfg(not(ovl_loader))]
fn emit(out: &mut Vec<u8>, lit: &[u8], m: Option<(usize, usize)>) {
    let ml = m.map_or(0, |(_, l)| l - MIN_MATCH);
    out.push(((lit.len().min(15) as u8) << 4) | ml.min(15) as u8);
    let ext = |out: &mut Vec<u8>, mut v: usize| {
        while v >= 255 {
            out.push(255);
            v -= 255;
        }
        out.push(v as u8);
    };
    if lit.len() >= 15 {
        ext(out, lit.len() - 15);
    }
    out.extend_from_slice(lit);
    if let Some((off, _)) = m {
        out.extend_from_slice(&(off as u16).to_le_bytes());
        if ml >= 15 {
            ext(out, ml - 15);
        }
    }
}

/// A 64-bit check of the unpacked runtime (four multiply-xor lanes: memory speed; it only has
/// to catch damage, the bundle's BLAKE3 is what `--ovl-verify` checks).
pub fn checksum(d: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |h: u64, w: u64| (h ^ w).wrapping_mul(K).rotate_left(29);
    let (mut a, mut b, mut c, mut e) = (K, K ^ 1, K ^ 2, K ^ 3);
    let mut chunks = d.chunks_exact(32);
    for x in &mut chunks {
        let w = |i: usize| u64::from_le_bytes(x[i * 8..i * 8 + 8].try_into().unwrap());
        (a, b, c, e) = (mix(a, w(0)), mix(b, w(1)), mix(c, w(2)), mix(e, w(3)));
    }
    let mut s = d.len() as u64;
    for &x in chunks.remainder() {
        s = mix(s, x as u64);
    }
    [a, b, c, e].into_iter().fold(s, mix)
}
