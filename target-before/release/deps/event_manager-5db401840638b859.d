/work/wt/lead/target-before/release/deps/event_manager-5db401840638b859.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/epoll.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/events.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/manager.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/subscribers.rs

/work/wt/lead/target-before/release/deps/libevent_manager-5db401840638b859.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/epoll.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/events.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/manager.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/subscribers.rs

/work/wt/lead/target-before/release/deps/libevent_manager-5db401840638b859.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/epoll.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/events.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/manager.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/subscribers.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/epoll.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/events.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/manager.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/event-manager-0.4.2/src/subscribers.rs:
