/work/wt/lead/target-before/release/deps/keel_irq-31d00560bc2ec0a7.d: crates/keel-irq/src/lib.rs crates/keel-irq/src/gsi.rs crates/keel-irq/src/irqchip.rs crates/keel-irq/src/line.rs crates/keel-irq/src/split.rs

/work/wt/lead/target-before/release/deps/libkeel_irq-31d00560bc2ec0a7.rlib: crates/keel-irq/src/lib.rs crates/keel-irq/src/gsi.rs crates/keel-irq/src/irqchip.rs crates/keel-irq/src/line.rs crates/keel-irq/src/split.rs

/work/wt/lead/target-before/release/deps/libkeel_irq-31d00560bc2ec0a7.rmeta: crates/keel-irq/src/lib.rs crates/keel-irq/src/gsi.rs crates/keel-irq/src/irqchip.rs crates/keel-irq/src/line.rs crates/keel-irq/src/split.rs

crates/keel-irq/src/lib.rs:
crates/keel-irq/src/gsi.rs:
crates/keel-irq/src/irqchip.rs:
crates/keel-irq/src/line.rs:
crates/keel-irq/src/split.rs:
