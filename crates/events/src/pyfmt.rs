//! Numbers as Python prints them: the Python services (and Celery's `saferepr`) format with `repr`/`str`, and what
//! they print is part of the wire (`text_representation`, `argsrepr`).

/// `repr(float)` of a finite float: the shortest digits that round-trip, fixed notation for exponents -4..16, else
/// `d.ddde±XX` (`7.0`, `6.5`, `0.0001`, `1e-05`, `1e+16`).
pub fn float_repr(value: f64) -> String {
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr: `1.5e16`, `-2e-5`, `0e0`.
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

/// `str(float)` (an f-string's `{x}`): [`float_repr`], and `nan`, `inf`, `-inf`.
pub fn float_str(value: f64) -> String {
    if value.is_nan() {
        "nan".into()
    } else if value.is_infinite() {
        if value > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        float_repr(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        // python3 -c 'print([str(x) for x in (7.0, 6.5, 1e15, 1e16, 0.0001, 1e-05, 1.5e-07, -2.5e+20, 0.1, -0.0)])'
        let python = [
            (7.0, "7.0"),
            (6.5, "6.5"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
            (1e-05, "1e-05"),
            (1.5e-07, "1.5e-07"),
            (-2.5e20, "-2.5e+20"),
            (0.1, "0.1"),
            (-0.0, "-0.0"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for (value, text) in python {
            assert_eq!(float_str(value), text, "{value}");
        }
    }
}
