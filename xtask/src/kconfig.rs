//! Kconfig fragments and `.config` files: parsing and the "did every option
//! of the fragment survive?" check.
//!
//! `make olddefconfig`/`allnoconfig` silently drop an option whose
//! dependencies are not met, so after configuring the kernel the xtask
//! compares the final `.config` with the fragment and refuses to build if any
//! requested value is missing.

use std::collections::BTreeMap;
use std::fmt;

/// The value of one Kconfig symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `CONFIG_X=y`
    Yes,
    /// `CONFIG_X=m`
    Module,
    /// `# CONFIG_X is not set` (or `CONFIG_X=n`)
    No,
    /// Anything else, verbatim: numbers, hex, quoted strings.
    Other(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Yes => f.write_str("y"),
            Value::Module => f.write_str("m"),
            Value::No => f.write_str("n"),
            Value::Other(v) => f.write_str(v),
        }
    }
}

/// One `CONFIG_NAME=value` assignment; `name` excludes the `CONFIG_` prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Symbol name without `CONFIG_`.
    pub name: String,
    /// Requested or configured value.
    pub value: Value,
    /// 1-based line number in the parsed text.
    pub line: usize,
}

/// Parses a fragment or a `.config`. Blank lines and comments are skipped,
/// except `# CONFIG_X is not set`, which means `n`. A symbol assigned twice is
/// an error (in a fragment that is nearly always a mistake; a generated
/// `.config` never does it).
pub fn parse(text: &str) -> Result<Vec<Setting>, String> {
    let mut out: Vec<Setting> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let l = raw.trim();
        let parsed = if l.is_empty() {
            None
        } else if let Some(rest) = l.strip_prefix('#') {
            let rest = rest.trim();
            match rest
                .strip_prefix("CONFIG_")
                .and_then(|r| r.strip_suffix(" is not set"))
            {
                Some(name) if is_symbol(name) => Some((name.to_string(), Value::No)),
                _ => None, // an ordinary comment
            }
        } else if let Some(rest) = l.strip_prefix("CONFIG_") {
            let (name, val) = rest
                .split_once('=')
                .ok_or_else(|| format!("line {line}: expected CONFIG_NAME=value, got `{l}`"))?;
            if !is_symbol(name) {
                return Err(format!("line {line}: bad symbol name `{name}`"));
            }
            let value = match val {
                "y" => Value::Yes,
                "m" => Value::Module,
                "n" => Value::No,
                "" => return Err(format!("line {line}: empty value for CONFIG_{name}")),
                v => Value::Other(v.to_string()),
            };
            Some((name.to_string(), value))
        } else {
            return Err(format!("line {line}: not a Kconfig assignment: `{l}`"));
        };
        if let Some((name, value)) = parsed {
            if let Some(first) = seen.insert(name.clone(), line) {
                return Err(format!(
                    "line {line}: CONFIG_{name} is already set on line {first}"
                ));
            }
            out.push(Setting { name, value, line });
        }
    }
    Ok(out)
}

fn is_symbol(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// A requested value that the final `.config` does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Symbol name without `CONFIG_`.
    pub name: String,
    /// What the fragment asked for.
    pub wanted: Value,
    /// What the `.config` has (`None`: the symbol is absent, i.e. its
    /// dependencies are not met).
    pub got: Option<Value>,
    /// Line of the request in the fragment.
    pub line: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CONFIG_{}={} (fragment line {}) was dropped: the final .config has ",
            self.name, self.wanted, self.line
        )?;
        match &self.got {
            None => write!(f, "no CONFIG_{} at all (unmet `depends on`?)", self.name),
            Some(Value::No) => write!(f, "`# CONFIG_{} is not set`", self.name),
            Some(v) => write!(f, "CONFIG_{}={v}", self.name),
        }
    }
}

/// Compares the fragment with the final `.config`.
///
/// * `y`, `m` and other values must appear in `.config` exactly.
/// * `n` (`# ... is not set`) must not be enabled: absent or `n` both pass,
///   since a symbol whose dependencies are off is not written at all.
pub fn check(fragment: &[Setting], config: &[Setting]) -> Vec<Mismatch> {
    let have: BTreeMap<&str, &Value> = config.iter().map(|s| (s.name.as_str(), &s.value)).collect();
    let mut bad = Vec::new();
    for want in fragment {
        let got = have.get(want.name.as_str()).copied();
        let ok = match (&want.value, got) {
            (Value::No, None) | (Value::No, Some(Value::No)) => true,
            (w, Some(g)) => w == g,
            (_, None) => false,
        };
        if !ok {
            bad.push(Mismatch {
                name: want.name.clone(),
                wanted: want.value.clone(),
                got: got.cloned(),
                line: want.line,
            });
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAGMENT: &str = "\
# Keel test fragment
CONFIG_64BIT=y
CONFIG_NR_CPUS=8
# CONFIG_PCI is not set
CONFIG_CMDLINE=\"console=ttyS0\"

CONFIG_VIRTIO_NET=y
# CONFIG_PTP_1588_CLOCK_KVM is not set
";

    #[test]
    fn parses_fragment() {
        let s = parse(FRAGMENT).unwrap();
        let names: Vec<_> = s.iter().map(|s| (s.name.as_str(), s.value.clone())).collect();
        assert_eq!(
            names,
            vec![
                ("64BIT", Value::Yes),
                ("NR_CPUS", Value::Other("8".into())),
                ("PCI", Value::No),
                ("CMDLINE", Value::Other("\"console=ttyS0\"".into())),
                ("VIRTIO_NET", Value::Yes),
                ("PTP_1588_CLOCK_KVM", Value::No),
            ]
        );
        assert_eq!(s[0].line, 2);
        assert_eq!(s[5].line, 8);
    }

    #[test]
    fn rejects_garbage_and_duplicates() {
        assert!(parse("VIRTIO_NET=y\n").unwrap_err().contains("line 1"));
        assert!(parse("CONFIG_VIRTIO_NET\n").is_err());
        assert!(parse("CONFIG_virtio=y\n").is_err());
        assert!(parse("CONFIG_X=\n").is_err());
        let dup = parse("CONFIG_X=y\n# CONFIG_X is not set\n").unwrap_err();
        assert!(dup.contains("line 2") && dup.contains("line 1"), "{dup}");
        // Ordinary comments, including ones that mention CONFIG_, are fine.
        assert!(parse("# see CONFIG_FOO below\n#\n").unwrap().is_empty());
    }

    #[test]
    fn all_survived() {
        let config = "\
CONFIG_64BIT=y
CONFIG_NR_CPUS=8
CONFIG_CMDLINE=\"console=ttyS0\"
CONFIG_VIRTIO_NET=y
CONFIG_EXTRA=y
";
        // PCI and PTP_1588_CLOCK_KVM are absent: that counts as "not set".
        let bad = check(&parse(FRAGMENT).unwrap(), &parse(config).unwrap());
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn reports_every_dropped_option() {
        let config = "\
CONFIG_64BIT=y
CONFIG_NR_CPUS=64
CONFIG_PCI=y
CONFIG_CMDLINE=\"console=ttyS0\"
# CONFIG_VIRTIO_NET is not set
CONFIG_PTP_1588_CLOCK_KVM=y
";
        let bad = check(&parse(FRAGMENT).unwrap(), &parse(config).unwrap());
        let names: Vec<_> = bad.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["NR_CPUS", "PCI", "VIRTIO_NET", "PTP_1588_CLOCK_KVM"]);
        let msg = bad[2].to_string();
        assert!(msg.contains("CONFIG_VIRTIO_NET=y"), "{msg}");
        assert!(msg.contains("dropped"), "{msg}");
        assert!(msg.contains("line 7"), "{msg}");
    }

    #[test]
    fn absent_symbol_is_named() {
        let bad = check(
            &parse("CONFIG_VIRTIO_VSOCKETS=y\n").unwrap(),
            &parse("CONFIG_VIRTIO=y\n").unwrap(),
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].got, None);
        assert!(bad[0].to_string().contains("unmet `depends on`"));
    }

    #[test]
    fn module_is_not_yes() {
        let bad = check(
            &parse("CONFIG_VIRTIO_BLK=y\n").unwrap(),
            &parse("CONFIG_VIRTIO_BLK=m\n").unwrap(),
        );
        assert_eq!(bad[0].got, Some(Value::Module));
    }
}
