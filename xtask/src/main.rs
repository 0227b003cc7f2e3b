//! `cargo xtask`: see the library documentation (`xtask/src/lib.rs`).

fn main() {
    std::process::exit(xtask::main_with_args(std::env::args().skip(1)));
}
