#!/bin/sh
echo "app running in $(pwd)"
