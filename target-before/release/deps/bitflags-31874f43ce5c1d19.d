/work/wt/lead/target-before/release/deps/bitflags-31874f43ce5c1d19.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/work/wt/lead/target-before/release/deps/libbitflags-31874f43ce5c1d19.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/work/wt/lead/target-before/release/deps/libbitflags-31874f43ce5c1d19.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs:
