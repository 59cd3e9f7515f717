//! FHIR date, dateTime and instant values as inclusive millisecond ranges.
//!
//! A partial date stands for the whole period it names: `2024` is every
//! millisecond of 2024. Values without a zone are read in Japan Standard Time
//! (+09:00), the zone every Japanese clinical system writes local times in.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

/// Offset applied to date and dateTime values that carry no zone.
pub const DEFAULT_OFFSET_SECS: i32 = 9 * 3600;

fn default_offset() -> FixedOffset {
    FixedOffset::east_opt(DEFAULT_OFFSET_SECS).expect("valid offset")
}

/// Parses a FHIR date/dateTime/instant (or a search value of that form) into an
/// inclusive range `[lo, hi]` of epoch milliseconds. None when malformed.
pub fn parse_range(s: &str) -> Option<(i64, i64)> {
    let s = s.trim();
    let (date_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let parts: Vec<&str> = date_part.split('-').collect();
    let year: i32 = parse_digits(parts.first()?, 4)?;
    let tz = default_offset();
    match (parts.len(), time_part) {
        (1, None) => {
            let lo = local_midnight(&tz, NaiveDate::from_ymd_opt(year, 1, 1)?)?;
            let hi = local_midnight(&tz, NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?)? - 1;
            Some((lo, hi))
        }
        (2, None) => {
            let month: u32 = parse_digits(parts[1], 2)?;
            let start = NaiveDate::from_ymd_opt(year, month, 1)?;
            let next = if month == 12 {
                NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(year, month + 1, 1)?
            };
            Some((local_midnight(&tz, start)?, local_midnight(&tz, next)? - 1))
        }
        (3, None) => {
            let d = NaiveDate::from_ymd_opt(
                year,
                parse_digits(parts[1], 2)?,
                parse_digits(parts[2], 2)?,
            )?;
            let lo = local_midnight(&tz, d)?;
            Some((lo, local_midnight(&tz, d.succ_opt()?)? - 1))
        }
        (3, Some(t)) => {
            let d = NaiveDate::from_ymd_opt(
                year,
                parse_digits(parts[1], 2)?,
                parse_digits(parts[2], 2)?,
            )?;
            parse_time_range(d, t)
        }
        _ => None,
    }
}

/// Parses an instant-like value (full date and time) to the start of its range.
pub fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    let (lo, _) = parse_range(s)?;
    Utc.timestamp_millis_opt(lo).single()
}

/// Formats as a FHIR instant with millisecond precision in UTC.
pub fn format_instant(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// HTTP date (RFC 7231) for Last-Modified.
pub fn format_http_date(t: &DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn parse_digits<T: std::str::FromStr>(s: &str, len: usize) -> Option<T> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn local_midnight(tz: &FixedOffset, d: NaiveDate) -> Option<i64> {
    let dt = NaiveDateTime::new(d, NaiveTime::MIN);
    Some(tz.from_local_datetime(&dt).single()?.timestamp_millis())
}

/// `hh:mm[:ss[.fff]][Z|±hh:mm]`; the range covers the precision written.
fn parse_time_range(d: NaiveDate, t: &str) -> Option<(i64, i64)> {
    let (clock, offset) = split_zone(t)?;
    let tz = match offset {
        Some(secs) => FixedOffset::east_opt(secs)?,
        None => default_offset(),
    };
    let fields: Vec<&str> = clock.split(':').collect();
    let h: u32 = parse_digits(fields.first()?, 2)?;
    let m: u32 = parse_digits(fields.get(1)?, 2)?;
    let (sec, frac, width_ms): (u32, u32, i64) = match fields.get(2) {
        None => (0, 0, 60_000),
        Some(s) => {
            let (whole, frac) = match s.split_once('.') {
                Some((w, f)) => (w, Some(f)),
                None => (*s, None),
            };
            let sec: u32 = parse_digits(whole, 2)?;
            match frac {
                None => (sec, 0, 1000),
                Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
                    let mut ms = f.chars().take(3).collect::<String>();
                    while ms.len() < 3 {
                        ms.push('0');
                    }
                    (sec, ms.parse().ok()?, 1)
                }
                _ => return None,
            }
        }
    };
    if fields.len() > 3 {
        return None;
    }
    // FHIR allows 24:00? No: R4 time is 00-23; leap second 60 is tolerated by clamping.
    let time = NaiveTime::from_hms_milli_opt(h, m, sec.min(59), frac)?;
    let lo = tz
        .from_local_datetime(&NaiveDateTime::new(d, time))
        .single()?
        .timestamp_millis();
    Some((lo, lo + width_ms - 1))
}

fn split_zone(t: &str) -> Option<(&str, Option<i32>)> {
    if let Some(c) = t.strip_suffix('Z') {
        return Some((c, Some(0)));
    }
    if let Some(pos) = t.rfind(['+', '-']) {
        let (c, z) = t.split_at(pos);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (hh, mm) = z[1..].split_once(':')?;
        let secs = parse_digits::<i32>(hh, 2)? * 3600 + parse_digits::<i32>(mm, 2)? * 60;
        return Some((c, Some(sign * secs)));
    }
    Some((t, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn partial_dates_cover_their_period_in_jst() {
        let (lo, hi) = parse_range("2024").unwrap();
        assert_eq!(lo, ms("2024-01-01T00:00:00+09:00"));
        assert_eq!(hi, ms("2025-01-01T00:00:00+09:00") - 1);
        let (lo, hi) = parse_range("2024-02").unwrap();
        assert_eq!(lo, ms("2024-02-01T00:00:00+09:00"));
        assert_eq!(hi, ms("2024-03-01T00:00:00+09:00") - 1);
        let (lo, hi) = parse_range("2024-12-31").unwrap();
        assert_eq!(hi - lo, 86_400_000 - 1);
    }

    #[test]
    fn times_with_zone_and_precision() {
        let (lo, hi) = parse_range("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(lo, ms("2024-05-01T10:00:00Z"));
        assert_eq!(hi, lo + 999);
        let (lo, hi) = parse_range("2024-05-01T10:00:00.123+09:00").unwrap();
        assert_eq!(lo, ms("2024-05-01T01:00:00.123Z"));
        assert_eq!(hi, lo);
        let (lo, hi) = parse_range("2024-05-01T10:00").unwrap();
        assert_eq!(hi - lo, 59_999);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "24",
            "2024-13",
            "2024-02-30",
            "2024-1-01",
            "2024-01-01T25:00:00Z",
            "abc",
            "2024-01-01T10:00:00+9",
        ] {
            assert!(parse_range(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn instant_format_roundtrip() {
        let t = parse_instant("2026-11-21T10:00:00.120Z").unwrap();
        assert_eq!(format_instant(&t), "2026-11-21T10:00:00.120Z");
    }
}
