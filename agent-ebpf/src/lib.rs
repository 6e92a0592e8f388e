#![no_std]
// The library target exists so that agent/ can name this crate as a build dependency
// (cache invalidation); the programs are the binary in main.rs.
