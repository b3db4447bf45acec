//! Dates and numbers as DynamoDB takes them: ISO dates from the spreadsheet forms, and numbers within
//! DynamoDB's range and precision written out as plain decimals (exponents included).

use super::*;
use crate::config::{DateFormat, DatePart};

pub(super) fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

/// `s` in date format `f`, appended to `out` as ISO `YYYY-MM-DD`; `false` (and `out` unchanged) when
/// it does not match or is no date of the calendar.
pub fn parse_date_as(s: &str, f: &DateFormat, out: &mut String) -> bool {
    let b = s.as_bytes();
    let (mut i, mut y, mut m, mut d) = (0usize, 0u32, 0u32, 0u32);
    let number = |i: &mut usize, min: usize, max: usize| -> Option<u32> {
        let mut n = 0u32;
        let from = *i;
        while *i < b.len() && *i - from < max && b[*i].is_ascii_digit() {
            n = n * 10 + u32::from(b[*i] - b'0');
            *i += 1;
        }
        (*i - from >= min).then_some(n)
    };
    for p in &f.parts {
        let got = match *p {
            DatePart::Year => number(&mut i, 4, 4).map(|n| y = n),
            DatePart::Month { min } => number(&mut i, min, 2).map(|n| m = n),
            DatePart::Day { min } => number(&mut i, min, 2).map(|n| d = n),
            DatePart::Literal(c) => (b.get(i) == Some(&c)).then(|| i += 1),
        };
        if got.is_none() {
            return false;
        }
    }
    if i != b.len() || !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return false;
    }
    let iso = [
        b'0' + (y / 1000) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
        b'-',
        b'0' + (m / 10) as u8,
        b'0' + (m % 10) as u8,
        b'-',
        b'0' + (d / 10) as u8,
        b'0' + (d % 10) as u8,
    ];
    // SAFETY: every byte of `iso` is an ASCII digit or '-', so it is UTF-8. (The checked conversion
    // and a push per char each cost more than the rest of the date's parse.)
    out.push_str(unsafe { std::str::from_utf8_unchecked(&iso) });
    true
}

/// `M/D/YYYY` (the classic walkthrough's format) or ISO `YYYY-MM-DD`, as ISO (the orders schema's
/// dates).
pub fn parse_date(s: &str) -> Option<String> {
    let mut out = String::with_capacity(10);
    ["M/D/YYYY", "YYYY-MM-DD"]
        .iter()
        .map(|f| DateFormat::parse(f).expect("built-in formats parse"))
        .any(|f| parse_date_as(s, &f, &mut out))
        .then_some(out)
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, in any case.
pub fn parse_bool(s: &str) -> Option<bool> {
    const TRUE: [&str; 3] = ["true", "1", "yes"];
    const FALSE: [&str; 3] = ["false", "0", "no"];
    if TRUE.iter().any(|t| s.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|t| s.eq_ignore_ascii_case(t)) {
        Some(false)
    } else {
        None
    }
}

/// A plain decimal (as [`parse_number_into`] writes them) in one spelling per value: no sign for
/// zero, no leading zeros before the point, no trailing zeros after it (`-01.50` is `-1.5`), so that
/// keys compare as DynamoDB compares numbers.
pub fn canonical_number(s: &str) -> std::borrow::Cow<'_, str> {
    let needs = s.starts_with(['+', '-', '0'])
        || (s.contains('.') && (s.ends_with('0') || s.ends_with('.')));
    if !needs {
        return std::borrow::Cow::Borrowed(s);
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.is_empty();
    let mut out = String::with_capacity(s.len());
    if neg && !zero {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    std::borrow::Cow::Owned(out)
}

/// Why a field is not a number DynamoDB accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberError {
    NotANumber,
    /// More than 38 significant digits.
    TooPrecise,
    /// Outside 1E-130 .. 9.99…E+125 in magnitude.
    OutOfRange,
}

/// A decimal that DynamoDB accepts as a number (at most 38 significant digits, magnitude from 1E-130
/// to below 1E+126), appended to `out`: a plain decimal as it is, with any leading `+` dropped; one in
/// exponent notation (`1.2E+05`, as spreadsheets export large values) as the plain decimal it stands for
/// (`120000`), so that every number in the table is written one way.
/// Returns the number's size as DynamoDB counts it.
pub fn parse_number_into(s: &str, integer: bool, out: &mut String) -> Result<usize, NumberError> {
    match parse_plain_into(s, integer, out) {
        Err(NumberError::NotANumber) => match s.bytes().position(|b| b == b'e' || b == b'E') {
            Some(e) => parse_exponent_into(&s[..e], &s[e + 1..], integer, out),
            None => Err(NumberError::NotANumber),
        },
        plain => plain,
    }
}

/// A plain decimal (no exponent), appended to `out` as it is when DynamoDB accepts it: one pass over
/// its bytes.
pub(super) fn parse_plain_into(
    s: &str,
    integer: bool,
    out: &mut String,
) -> Result<usize, NumberError> {
    let b = s.as_bytes();
    if let Some(size) = plain_fast(b, integer) {
        out.push_str(s.strip_prefix('+').unwrap_or(s));
        return Ok(size);
    }
    let body = usize::from(b.first() == Some(&b'+'));
    let mut i = body;
    if b.get(i) == Some(&b'-') {
        if integer {
            return Err(NumberError::NotANumber); // a count of units is never negative
        }
        i += 1;
    }
    let digits_from = |i: &mut usize| {
        let from = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        &b[from..*i]
    };
    let int = digits_from(&mut i);
    let frac: &[u8] = if b.get(i) == Some(&b'.') {
        if integer {
            return Err(NumberError::NotANumber);
        }
        i += 1;
        digits_from(&mut i)
    } else {
        &[]
    };
    if i != b.len() || (int.is_empty() && frac.is_empty()) {
        return Err(NumberError::NotANumber);
    }
    let zeros = |d: &[u8]| d.iter().take_while(|&&c| c == b'0').count();
    let int_lead = zeros(int);
    let int_digits = int.len() - int_lead;
    let frac_zeros = zeros(frac);
    let (frac_len, nonzero) = (frac.len(), int_digits > 0 || frac_zeros < frac.len());
    if nonzero {
        // Significant digits: from the first non-zero digit to the last non-zero one, across the point.
        let leading = if int_digits > 0 {
            int_lead
        } else {
            int.len() + frac_zeros
        };
        let trailing_frac = frac.iter().rev().take_while(|&&c| c == b'0').count();
        let trailing = if trailing_frac == frac.len() {
            trailing_frac + int.iter().rev().take_while(|&&c| c == b'0').count()
        } else {
            trailing_frac
        };
        if int.len() + frac.len() - leading - trailing > MAX_NUMBER_DIGITS {
            return Err(NumberError::TooPrecise);
        }
    }
    if int_digits > MAX_INTEGER_DIGITS
        || (nonzero && int_digits == 0 && frac_zeros > MAX_FRACTION_LEADING_ZEROS)
    {
        return Err(NumberError::OutOfRange);
    }
    out.push_str(&s[body..]);
    // About one byte per two digits from the first non-zero one, plus one.
    let digits = if int_digits > 0 {
        int_digits + frac_len
    } else {
        frac_len - frac_zeros
    };
    Ok(digits.div_ceil(2) + 1)
}

/// Most numbers: an optional sign, at most 38 digits, at most one point. Within every limit of
/// DynamoDB's whatever their zeros; their size (about one byte per two digits from the first
/// non-zero one, plus one) from one pass. `None`: anything else (judged by the full parse).
fn plain_fast(b: &[u8], integer: bool) -> Option<usize> {
    let mut i = usize::from(b.first() == Some(&b'+'));
    if !integer && b.get(i) == Some(&b'-') {
        i += 1;
    }
    let digits = &b[i..];
    if digits.is_empty() || digits.len() > MAX_NUMBER_DIGITS {
        return None;
    }
    let (mut point, mut lead, mut seen) = (usize::MAX, 0, false);
    for (j, &c) in digits.iter().enumerate() {
        if c.is_ascii_digit() {
            if !seen && c == b'0' {
                lead += 1;
            } else {
                seen = true;
            }
        } else if c == b'.' && point == usize::MAX && !integer {
            point = j;
        } else {
            return None;
        }
    }
    let count = digits.len() - usize::from(point != usize::MAX);
    if count == 0 {
        return None;
    }
    Some((count - lead).div_ceil(2) + 1)
}

/// `mantissa`E`exponent` written out as the plain decimal it stands for, then judged as one.
pub(super) fn parse_exponent_into(
    mantissa: &str,
    exponent: &str,
    integer: bool,
    out: &mut String,
) -> Result<usize, NumberError> {
    let mantissa = mantissa.strip_prefix('+').unwrap_or(mantissa);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = || int.bytes().chain(frac.bytes());
    let exp_digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    if (int.is_empty() && frac.is_empty())
        || !digits().all(|b| b.is_ascii_digit())
        || exp_digits.is_empty()
        || !exp_digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(NumberError::NotANumber);
    }
    let total = int.len() + frac.len();
    let leading = digits().take_while(|&b| b == b'0').count();
    if leading == total {
        // Zero, whatever its exponent, written unsigned (a count of units still may not be negative).
        let zero = if integer && !sign.is_empty() {
            "-0"
        } else {
            "0"
        };
        return parse_plain_into(zero, integer, out);
    }
    let trailing = digits().rev().take_while(|&b| b == b'0').count();
    let significant = total - leading - trailing;
    if significant > MAX_NUMBER_DIGITS {
        return Err(NumberError::TooPrecise);
    }
    // Bounded before it is written out: a longer exponent is out of range whatever the mantissa.
    let exp: i64 = match exp_digits.trim_start_matches('0') {
        e if e.len() > 9 => return Err(NumberError::OutOfRange),
        e => e.parse().unwrap_or(0),
    };
    let exp = if exponent.starts_with('-') { -exp } else { exp };
    // Digits of the significant part before the point (negative: zeros after the point first).
    let before = int.len() as i64 - leading as i64 + exp;
    if before > MAX_INTEGER_DIGITS as i64 || -before > MAX_FRACTION_LEADING_ZEROS as i64 {
        return Err(NumberError::OutOfRange);
    }
    let mut plain = String::with_capacity(significant + before.unsigned_abs() as usize + 3);
    plain.push_str(sign);
    let mut sig = digits().skip(leading).take(significant).map(char::from);
    if before <= 0 {
        plain.push_str("0.");
        plain.extend(std::iter::repeat('0').take((-before) as usize));
        plain.extend(sig);
    } else {
        plain.extend(sig.by_ref().take(before as usize));
        plain.extend(std::iter::repeat('0').take((before as usize).saturating_sub(significant)));
        if before < significant as i64 {
            plain.push('.');
            plain.extend(sig);
        }
    }
    parse_plain_into(&plain, integer, out)
}

/// [`parse_number_into`] returning a new string.
pub fn parse_number(s: &str, integer: bool) -> Option<String> {
    let mut out = String::new();
    parse_number_into(s, integer, &mut out).ok().map(|_| out)
}
