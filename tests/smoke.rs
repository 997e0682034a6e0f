mod common;
use common::*;
use std::fs;

#[test]
fn read_lower_write_copies_up() {
    let m = Mounted::new(|l| {
        fs::write(l.join("a"), "hello").unwrap();
    });
    assert_eq!(fs::read_to_string(m.p("a")).unwrap(), "hello");
    fs::write(m.p("a"), "changed").unwrap();
    assert_eq!(fs::read_to_string(m.p("a")).unwrap(), "changed");
    assert_eq!(fs::read_to_string(m.lower.join("a")).unwrap(), "hello");
    assert_eq!(fs::read_to_string(m.upper.join("a")).unwrap(), "changed");
}
