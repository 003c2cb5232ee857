//! Kubernetes resource quantities (`1Gi`, `512Mi`, `1G`, `1.5Gi`, `1e9`, `500m`, a bare
//! number) as bytes, or as whole CPUs.

use serde_json::Value;

/// The bytes a quantity stands for, rounded up to a whole byte; `None` when it is not one.
pub fn bytes(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse(s.trim()),
        _ => None,
    }
}

/// The CPUs a quantity (`2`, `500m`, `1.5`) stands for, rounded up to a whole CPU, as KubeVirt
/// counts vCPUs from a CPU request or limit.
pub fn cpus(value: &Value) -> Option<u64> {
    bytes(value)
}

fn parse(s: &str) -> Option<u64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    // The number as digits over a power of ten.
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    let mut denominator: u128 = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let multiplier: u128 = match suffix {
        "" => 1,
        "m" => {
            denominator = denominator.checked_mul(1000)?;
            1
        }
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        e if e.starts_with(['e', 'E']) => {
            let exponent: i32 = e[1..].parse().ok()?;
            if exponent >= 0 {
                10u128.checked_pow(exponent.unsigned_abs())?
            } else {
                denominator =
                    denominator.checked_mul(10u128.checked_pow(exponent.unsigned_abs())?)?;
                1
            }
        }
        _ => return None,
    };
    let bytes = digits.checked_mul(multiplier)?.div_ceil(denominator);
    u64::try_from(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let q = |s: &str| bytes(&Value::String(s.into()));
        assert_eq!(q("1Gi"), Some(1 << 30));
        assert_eq!(q("512Mi"), Some(512 << 20));
        assert_eq!(q("1.5Gi"), Some(3 << 29));
        assert_eq!(q("1G"), Some(1_000_000_000));
        assert_eq!(q("64M"), Some(64_000_000));
        assert_eq!(q("2k"), Some(2000));
        assert_eq!(q("1e9"), Some(1_000_000_000));
        assert_eq!(q("15e-1"), Some(2));
        assert_eq!(q("0.5"), Some(1));
        assert_eq!(q("134217728"), Some(134_217_728));
        assert_eq!(bytes(&serde_json::json!(4096)), Some(4096));
        let cpus = |s: &str| cpus(&Value::String(s.into()));
        assert_eq!(cpus("500m"), Some(1));
        assert_eq!(cpus("2500m"), Some(3));
        assert_eq!(cpus("2"), Some(2));
        assert_eq!(cpus("1.5"), Some(2));
        for bad in [
            "", "Gi", "1 Gi", "1gi", "1GB", "-1Gi", "1..2", "x", "16Ei", "1e40",
        ] {
            assert_eq!(q(bad), None, "{bad}");
        }
        assert_eq!(bytes(&serde_json::json!(-3)), None);
        assert_eq!(bytes(&serde_json::json!(true)), None);
    }
}
