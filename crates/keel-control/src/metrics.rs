//! Counters behind Firecracker-style metrics: named groups of named
//! monotonic counters, written as one JSON object per flush or as
//! Prometheus text.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Counters by group and name (`put_api_requests` / `actions_count`). A
/// counter exists once it was incremented or set.
#[derive(Debug, Default)]
pub struct MetricsRegistry {
    counters: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
}

impl MetricsRegistry {
    /// Adds `by` to `group.name`.
    pub fn add(&self, group: &str, name: &str, by: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let slot = counters
            .entry(group.to_string())
            .or_default()
            .entry(name.to_string())
            .or_default();
        *slot = slot.saturating_add(by);
    }

    /// Sets `group.name` to `value` (for counters sampled from devices).
    pub fn set(&self, group: &str, name: &str, value: u64) {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(group.to_string())
            .or_default()
            .insert(name.to_string(), value);
    }

    /// `group.name`, 0 if never counted.
    pub fn get(&self, group: &str, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .and_then(|g| g.get(name))
            .copied()
            .unwrap_or(0)
    }

    /// Every counter as `{"utc_timestamp_ms": …, "uptime_ms": …, GROUP:
    /// {NAME: VALUE}}`: Firecracker's metrics line layout.
    pub fn snapshot_json(&self, uptime: Duration) -> serde_json::Value {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut object = serde_json::Map::new();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        object.insert("utc_timestamp_ms".into(), now_ms.into());
        object.insert("uptime_ms".into(), (uptime.as_millis() as u64).into());
        for (group, names) in counters.iter() {
            let inner: serde_json::Map<String, serde_json::Value> =
                names.iter().map(|(n, v)| (n.clone(), (*v).into())).collect();
            object.insert(group.clone(), inner.into());
        }
        object.into()
    }

    /// Every counter in Prometheus' text exposition format, as
    /// `keel_GROUP_NAME VALUE` (characters outside `[a-zA-Z0-9_]` become
    /// `_`).
    pub fn prometheus(&self, uptime: Duration) -> String {
        fn name(s: &str) -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        }
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        out.push_str("# TYPE keel_uptime_seconds gauge\n");
        out.push_str(&format!("keel_uptime_seconds {:.3}\n", uptime.as_secs_f64()));
        for (group, names) in counters.iter() {
            for (n, v) in names {
                let metric = format!("keel_{}_{}", name(group), name(n));
                out.push_str(&format!("# TYPE {metric} counter\n{metric} {v}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_json_and_prometheus() {
        let m = MetricsRegistry::default();
        m.add("put_api_requests", "actions_count", 1);
        m.add("put_api_requests", "actions_count", 2);
        m.set("block.rootfs", "read_bytes", 4096);
        assert_eq!(m.get("put_api_requests", "actions_count"), 3);
        let json = m.snapshot_json(Duration::from_millis(1500));
        assert_eq!(json["put_api_requests"]["actions_count"], 3);
        assert_eq!(json["block.rootfs"]["read_bytes"], 4096);
        assert_eq!(json["uptime_ms"], 1500);
        let text = m.prometheus(Duration::from_secs(2));
        assert!(text.contains("keel_put_api_requests_actions_count 3\n"), "{text}");
        assert!(text.contains("keel_block_rootfs_read_bytes 4096\n"), "{text}");
        assert!(text.contains("keel_uptime_seconds 2.000\n"), "{text}");
    }
}
