//! A kernel image of arbitrary bytes given to Keel's loader (ELF vmlinux
//! with or without a PVH note, bzImage), as `--kernel` would.
#![no_main]

use keel_memory::GuestLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layout = GuestLayout::new(32 << 20).unwrap();
    let mem = layout.create_memory().unwrap();
    if let Ok(kernel) = keel_boot::load_kernel(&mem, &mut std::io::Cursor::new(data)) {
        let _ = kernel.with_pvh_entry();
    }
});
