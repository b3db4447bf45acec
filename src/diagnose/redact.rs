//! Secrets out of everything `diagnose` collects, two ways: the values known to be secret on this host
//! (the credentials files' keys and tokens, proxy passwords, SecureString parameters, the activation
//! code in the environment) wherever they appear, and anything that looks like one — an AWS access key
//! id, a long token, a URL's password, the value of a key named like a secret, the argument of
//! `-code`/`--activation-code`.

/// What replaces a secret.
pub(crate) const MASK: &str = "<redacted>";

/// Parts of key names whose values are secret (compared lower-case, without `_`, `-` and `.`).
const SECRET_KEY_PARTS: [&str; 9] = [
    "secret",
    "token",
    "password",
    "passwd",
    "activationcode",
    "accesskey",
    "privatekey",
    "apikey",
    "credential",
];

/// Flags whose next argument is secret.
const SECRET_FLAGS: [&str; 3] = ["-code", "--activation-code", "--code"];

/// The redactor, with this host's known secrets.
#[derive(Debug, Default, Clone)]
pub(crate) struct Redactor {
    known: Vec<String>,
}

impl Redactor {
    /// Add a value known to be secret; too short to be told apart from ordinary text, it is left to
    /// the patterns.
    pub(crate) fn know(&mut self, secret: &str) {
        let s = secret.trim();
        if s.len() >= 6 && !self.known.iter().any(|k| k == s) {
            self.known.push(s.to_string());
            // Longest first, so that a secret containing another is masked whole.
            self.known.sort_by_key(|k| std::cmp::Reverse(k.len()));
        }
    }

    /// The text with every secret masked.
    pub(crate) fn text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for k in &self.known {
            if out.contains(k.as_str()) {
                out = out.replace(k.as_str(), MASK);
            }
        }
        let out = url_passwords(&out);
        let out = keyed_values(&out);
        let out = flag_values(&out);
        tokens(&out)
    }
}

/// `scheme://user:password@host` → `scheme://user:<redacted>@host`.
fn url_passwords(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'' || c == ',')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(a), Some(c)) if c < a => {
                out.push_str(&authority[..=c]);
                out.push_str(MASK);
                out.push_str(&authority[a..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'
}

fn secret_key(word: &str) -> bool {
    let norm: String = word
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    // An id names a key, it is not one; a "...File" or "...Path" names where it is.
    if ["file", "path", "expiresat", "retrievedat"]
        .iter()
        .any(|s| norm.ends_with(s))
    {
        return false;
    }
    SECRET_KEY_PARTS.iter().any(|p| norm.contains(p))
}

/// Where a value that starts at `i` ends: at white space, a quote, a comma, a brace, `;` or `&`.
fn value_end(s: &str, i: usize) -> usize {
    s[i..]
        .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '}' | ';' | '&'))
        .map_or(s.len(), |n| i + n)
}

/// `secret_key = value`, `SECRET_KEY=value`, `"SecretKey": "value"`, `token: value` → the value masked.
fn keyed_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let b = s.as_bytes();
    while i < s.len() {
        let c = s[i..].chars().next().unwrap_or(' ');
        if !is_word(c) {
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        let start = i;
        while i < s.len() && is_word(b[i] as char) {
            i += 1;
        }
        let word = &s[start..i];
        out.push_str(word);
        if !secret_key(word) {
            continue;
        }
        // An optional closing quote, spaces, `=` or `:`, spaces, an optional opening quote.
        let mut j = i;
        if j < s.len() && (b[j] == b'"' || b[j] == b'\'') {
            j += 1;
        }
        while j < s.len() && b[j] == b' ' {
            j += 1;
        }
        if j >= s.len() || !(b[j] == b'=' || b[j] == b':') {
            continue;
        }
        j += 1;
        while j < s.len() && b[j] == b' ' {
            j += 1;
        }
        if j < s.len() && (b[j] == b'"' || b[j] == b'\'') {
            j += 1;
        }
        let end = value_end(s, j);
        if end > j && &s[j..end] != MASK {
            out.push_str(&s[i..j]);
            out.push_str(MASK);
            i = end;
        }
    }
    out
}

/// `-code VALUE`, `--activation-code VALUE` (and `=VALUE`) → the value masked.
fn flag_values(s: &str) -> String {
    let mut out = s.to_string();
    for flag in SECRET_FLAGS {
        let mut from = 0;
        while let Some(n) = out[from..].find(flag) {
            let at = from + n;
            let after = at + flag.len();
            let boundary_before = at == 0 || out[..at].ends_with(char::is_whitespace);
            let sep = out[after..].chars().next();
            if !boundary_before || !matches!(sep, Some(' ') | Some('=')) {
                from = after;
                continue;
            }
            let mut v = after + 1;
            while out[v..].starts_with(' ') {
                v += 1;
            }
            let end = value_end(&out, v);
            if end > v {
                out.replace_range(v..end, MASK);
            }
            from = v + MASK.len().min(out.len() - v);
        }
    }
    out
}

/// AWS access key ids (`AKIA…`, `ASIA…`: 20 upper-case letters and digits) and long tokens (40 or
/// more characters of base64 with upper and lower case and a digit or `+`/`/`: secret keys, session
/// tokens) → masked. Hex digests and container ids (lower case) are kept.
fn tokens(s: &str) -> String {
    let tokenish = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let c = s[i..].chars().next().unwrap_or(' ');
        if !tokenish(c) {
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        let start = i;
        while i < s.len() && tokenish(s.as_bytes()[i] as char) {
            i += 1;
        }
        let t = &s[start..i];
        if access_key_id(t) || long_token(t) {
            out.push_str(MASK);
        } else {
            out.push_str(t);
        }
    }
    out
}

fn access_key_id(t: &str) -> bool {
    t.len() == 20
        && [
            "AKIA", "ASIA", "AIDA", "AROA", "AGPA", "ANPA", "ANVA", "AIPA",
        ]
        .iter()
        .any(|p| t.starts_with(p))
        && t.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

fn long_token(t: &str) -> bool {
    // Path-like runs ("/usr/lib/x86_64-linux-gnu/...") are not tokens.
    if t.len() < 40 || t.matches('/').count() > 3 {
        return false;
    }
    let upper = t.chars().any(|c| c.is_ascii_uppercase());
    let lower = t.chars().any(|c| c.is_ascii_lowercase());
    let other = t
        .chars()
        .any(|c| c.is_ascii_digit() || c == '+' || c == '/');
    upper && lower && other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_secrets_and_their_look_alikes_are_masked() {
        let mut r = Redactor::default();
        r.know("hunter2-but-longer");
        let text = r#"proxy http://alice:Pr0xy%40pass@proxy.corp:3128 said hunter2-but-longer
aws_access_key_id = AKIAIOSFODNN7EXAMPLE
aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
AWS_SESSION_TOKEN=IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD
{"SecretAccessKey": "abc", "Token":"xyz", "AccessKeyId": "ASIAXXXXXXXXXXXXXXXX"}
amazon-ssm-agent -register -code Xy12AbCd34EfGh56IjKl -id 1234 -region eu-west-1
register --activation-code=SECRETCODE123
ordinary line: image sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 and /usr/lib/x86_64-linux-gnu/libc.so
CredentialsFile=/root/.aws/credentials CredentialsExpiresAt=2026-12-02T10:00:00Z"#;
        let out = r.text(text);
        for secret in [
            "Pr0xy%40pass",
            "hunter2-but-longer",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI",
            "IQoJb3JpZ2lu",
            "\"abc\"",
            "xyz",
            "ASIAXXXXXXXXXXXXXXXX",
            "Xy12AbCd34EfGh56IjKl",
            "SECRETCODE123",
        ] {
            assert!(!out.contains(secret), "{secret} left in:\n{out}");
        }
        for kept in [
            "http://alice:<redacted>@proxy.corp:3128",
            "-id 1234 -region eu-west-1",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "/usr/lib/x86_64-linux-gnu/libc.so",
            "CredentialsFile=/root/.aws/credentials",
            "CredentialsExpiresAt=2026-12-02T10:00:00Z",
            "ordinary line",
        ] {
            assert!(out.contains(kept), "{kept} lost:\n{out}");
        }
    }
}
