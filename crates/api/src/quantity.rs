//! Kubernetes quantities as byte counts (`64Mi`, `1Gi`, `500M`, `1048576`).

/// Why a quantity was refused.
pub(crate) type QuantityError = String;

/// The number of bytes a quantity names; binary (`Ki`..`Ei`) and decimal (`k`..`E`) suffixes,
/// fractions allowed (`1.5Gi`), rounded up to a whole byte.
pub(crate) fn bytes(q: &str) -> Result<u64, QuantityError> {
    let err = || {
        format!(
            "invalid quantity {q:?}: expected a number with an optional suffix such as Ki, Mi, Gi, k, M or G"
        )
    };
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let factor: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(err()),
    };
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return Err(err());
    }
    let value: f64 = num.parse().map_err(|_| err())?;
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = (value * factor as f64).ceil();
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(err());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(bytes("64Mi"), Ok(64 << 20));
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("500M"), Ok(500_000_000));
        assert_eq!(bytes("1048576"), Ok(1_048_576));
        assert_eq!(bytes("1.5Ki"), Ok(1536));
        for bad in ["", "Mi", "12Q", "1.2.3", "-5", ".5Mi", "5 Mi"] {
            assert!(bytes(bad).is_err(), "{bad:?}");
        }
    }
}
