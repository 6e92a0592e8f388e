//! The text primitives of `wirescope status`: colours, cutting and padding to columns,
//! wrapping and packing into [`WIDTH`]-column lines, and durations, ages, byte counts and
//! UTC times in a few characters.

/// The width every line fits in.
pub const WIDTH: usize = 80;

pub(super) const BOLD: &str = "\x1b[1m";
pub(super) const DIM: &str = "\x1b[2m";
pub(super) const RED: &str = "\x1b[31m";
pub(super) const GREEN: &str = "\x1b[32m";
pub(super) const CYAN: &str = "\x1b[36m";

pub(super) fn paint(s: &str, code: &str, color: bool) -> String {
    if color {
        format!("{code}{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// `s` cut to `n` characters, the last one `…` when cut.
pub(super) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// A public key (or anything long) as its first 8 characters and `…`.
pub fn abbrev(key: &str) -> String {
    if key.chars().count() <= 9 {
        key.to_string()
    } else {
        let mut s: String = key.chars().take(8).collect();
        s.push('…');
        s
    }
}

/// `s` left-aligned in `w` columns (cut with `…` when longer).
pub(super) fn cell(s: &str, w: usize) -> String {
    let t = truncate(s, w);
    let pad = w.saturating_sub(t.chars().count());
    format!("{t}{}", " ".repeat(pad))
}

/// A duration in seconds with a unit that keeps 2-3 significant digits.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        "?".into()
    } else if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 0.1 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// An age in whole seconds below 10 minutes, then minutes, hours, days.
pub fn fmt_age(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let s = s.round() as u64;
    match s {
        0..600 => format!("{s} s"),
        600..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// UNIX seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_utc(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let rem = t % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `text` wrapped at word boundaries into lines of at most [`WIDTH`] columns: the first
/// indented by `first`, the rest by `rest`. A word longer than a line is cut.
pub(super) fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = " ".repeat(first);
    let mut len = first;
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let wl = word.chars().count();
        if !empty && len + 1 + wl > WIDTH {
            out.push(std::mem::take(&mut line));
            line = " ".repeat(rest);
            len = rest;
            empty = true;
        }
        let room = WIDTH.saturating_sub(if empty { len } else { len + 1 });
        let w = truncate(word, room.max(1));
        if !empty {
            line.push(' ');
            len += 1;
        }
        len += w.chars().count();
        line.push_str(&w);
        empty = false;
    }
    if !empty || out.is_empty() {
        out.push(line);
    }
    out
}

/// Items (each kept whole when it fits) packed onto lines indented by `indent`, separated
/// by two spaces, none wider than [`WIDTH`].
pub(super) fn pack(items: &[String], indent: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    for item in items {
        let il = item.chars().count();
        let cur = line.chars().count();
        if cur > 0 && cur + 2 + il > WIDTH {
            out.push(std::mem::take(&mut line));
        }
        if line.is_empty() {
            if indent + il > WIDTH {
                // Too long for one line on its own: wrapped by words.
                out.extend(wrap(item, indent, indent + 2));
                continue;
            }
            line = format!("{}{item}", " ".repeat(indent));
        } else {
            line.push_str("  ");
            line.push_str(item);
        }
    }
    if !line.is_empty() {
        out.push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = "FXUjJ9fcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn formats() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_age(12.4), "12 s");
        assert_eq!(fmt_age(599.0), "599 s");
        assert_eq!(fmt_age(3600.0), "60 min");
        assert_eq!(fmt_age(86_400.0 * 3.0), "3 d");
        assert_eq!(fmt_secs(0.000115), "115 us");
        assert_eq!(fmt_secs(0.00058), "580 us");
        assert_eq!(fmt_secs(0.0042), "4.20 ms");
        assert_eq!(fmt_secs(0.25), "250 ms");
        assert_eq!(fmt_secs(2.5), "2.50 s");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(abbrev(ENTRY), "FXUjJ9fc…");
        assert_eq!(abbrev("eth0"), "eth0");
        let w = wrap(&"word ".repeat(40), 2, 4);
        assert!(w.len() > 1 && w.iter().all(|l| l.chars().count() <= WIDTH));
        assert!(w[1].starts_with("    word"));
    }
}
