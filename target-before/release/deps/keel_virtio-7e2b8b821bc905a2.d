/work/wt/lead/target-before/release/deps/keel_virtio-7e2b8b821bc905a2.d: crates/keel-virtio/src/lib.rs crates/keel-virtio/src/activation.rs crates/keel-virtio/src/block/mod.rs crates/keel-virtio/src/block/backend.rs crates/keel-virtio/src/block/tests.rs crates/keel-virtio/src/chain.rs crates/keel-virtio/src/console/mod.rs crates/keel-virtio/src/console/backend.rs crates/keel-virtio/src/console/tests.rs crates/keel-virtio/src/device.rs crates/keel-virtio/src/guest_driver.rs crates/keel-virtio/src/mmio.rs crates/keel-virtio/src/mmio/tests.rs crates/keel-virtio/src/net/mod.rs crates/keel-virtio/src/net/backend.rs crates/keel-virtio/src/net/tests.rs crates/keel-virtio/src/rng.rs crates/keel-virtio/src/vsock/mod.rs crates/keel-virtio/src/vsock/conn.rs crates/keel-virtio/src/vsock/muxer.rs crates/keel-virtio/src/vsock/packet.rs crates/keel-virtio/src/vsock/tests.rs

/work/wt/lead/target-before/release/deps/keel_virtio-7e2b8b821bc905a2: crates/keel-virtio/src/lib.rs crates/keel-virtio/src/activation.rs crates/keel-virtio/src/block/mod.rs crates/keel-virtio/src/block/backend.rs crates/keel-virtio/src/block/tests.rs crates/keel-virtio/src/chain.rs crates/keel-virtio/src/console/mod.rs crates/keel-virtio/src/console/backend.rs crates/keel-virtio/src/console/tests.rs crates/keel-virtio/src/device.rs crates/keel-virtio/src/guest_driver.rs crates/keel-virtio/src/mmio.rs crates/keel-virtio/src/mmio/tests.rs crates/keel-virtio/src/net/mod.rs crates/keel-virtio/src/net/backend.rs crates/keel-virtio/src/net/tests.rs crates/keel-virtio/src/rng.rs crates/keel-virtio/src/vsock/mod.rs crates/keel-virtio/src/vsock/conn.rs crates/keel-virtio/src/vsock/muxer.rs crates/keel-virtio/src/vsock/packet.rs crates/keel-virtio/src/vsock/tests.rs

crates/keel-virtio/src/lib.rs:
crates/keel-virtio/src/activation.rs:
crates/keel-virtio/src/block/mod.rs:
crates/keel-virtio/src/block/backend.rs:
crates/keel-virtio/src/block/tests.rs:
crates/keel-virtio/src/chain.rs:
crates/keel-virtio/src/console/mod.rs:
crates/keel-virtio/src/console/backend.rs:
crates/keel-virtio/src/console/tests.rs:
crates/keel-virtio/src/device.rs:
crates/keel-virtio/src/guest_driver.rs:
crates/keel-virtio/src/mmio.rs:
crates/keel-virtio/src/mmio/tests.rs:
crates/keel-virtio/src/net/mod.rs:
crates/keel-virtio/src/net/backend.rs:
crates/keel-virtio/src/net/tests.rs:
crates/keel-virtio/src/rng.rs:
crates/keel-virtio/src/vsock/mod.rs:
crates/keel-virtio/src/vsock/conn.rs:
crates/keel-virtio/src/vsock/muxer.rs:
crates/keel-virtio/src/vsock/packet.rs:
crates/keel-virtio/src/vsock/tests.rs:
