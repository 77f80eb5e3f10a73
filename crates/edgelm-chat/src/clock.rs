//! `strftime_now(format)`, the date helper HF gives templates (Llama 3 style templates print
//! "Today Date: 26 Jul 2024" with it).
//!
//! Python formats the local time; edgelm reads no time-zone database, so this is UTC (what the
//! machines it runs on use). The directives are the C library's common ones plus glibc's `%-d`
//! style no-padding flag; anything else is copied through as glibc does.

use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday
    pub weekday: u32,
    /// 1..=366
    pub yday: u32,
}

impl DateTime {
    pub fn now() -> DateTime {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        DateTime::from_unix(secs)
    }

    pub fn from_unix(secs: i64) -> DateTime {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let jan1 = days_from_civil(year, 1, 1);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            yday: (days - jan1 + 1) as u32,
        }
    }

    pub fn format(&self, fmt: &str) -> String {
        let mut out = String::new();
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let pad = if chars.peek() == Some(&'-') {
                chars.next();
                false
            } else {
                true
            };
            let Some(d) = chars.next() else {
                out.push('%');
                break;
            };
            let num = |n: i64, width: usize| {
                if pad {
                    format!("{n:0width$}")
                } else {
                    n.to_string()
                }
            };
            let hour12 = (self.hour + 11) % 12 + 1;
            let piece = match d {
                'a' => DAYS[self.weekday as usize][..3].to_owned(),
                'A' => DAYS[self.weekday as usize].to_owned(),
                'b' | 'h' => MONTHS[self.month as usize - 1][..3].to_owned(),
                'B' => MONTHS[self.month as usize - 1].to_owned(),
                'd' => num(self.day.into(), 2),
                'e' => format!("{:>2}", self.day),
                'm' => num(self.month.into(), 2),
                'y' => num(self.year.rem_euclid(100), 2),
                'Y' => self.year.to_string(),
                'H' => num(self.hour.into(), 2),
                'I' => num(hour12.into(), 2),
                'M' => num(self.minute.into(), 2),
                'S' => num(self.second.into(), 2),
                'p' => if self.hour < 12 { "AM" } else { "PM" }.to_owned(),
                'j' => num(self.yday.into(), 3),
                'u' => (self.weekday + 1).to_string(),
                'w' => ((self.weekday + 1) % 7).to_string(),
                'F' => self.format("%Y-%m-%d"),
                'D' => self.format("%m/%d/%y"),
                'T' => self.format("%H:%M:%S"),
                'R' => self.format("%H:%M"),
                'c' => self.format("%a %b %e %H:%M:%S %Y"),
                'x' => self.format("%m/%d/%y"),
                'X' => self.format("%H:%M:%S"),
                'Z' => "UTC".to_owned(),
                'z' => "+0000".to_owned(),
                'n' => "\n".to_owned(),
                't' => "\t".to_owned(),
                '%' => "%".to_owned(),
                other => {
                    let mut s = String::from('%');
                    if !pad {
                        s.push('-');
                    }
                    s.push(other);
                    s
                }
            };
            out.push_str(&piece);
        }
        out
    }
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::DateTime;

    #[test]
    fn formats_known_instants() {
        // 2024-07-26 13:25:09 UTC, a Friday (expected texts are Python's).
        let t = DateTime::from_unix(1_722_000_309);
        assert_eq!(t.format("%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            t.format("%A %B %-d, %H:%M:%S %p %j %%"),
            "Friday July 26, 13:25:09 PM 208 %"
        );
        assert_eq!(t.format("%I %y %F %Q"), "01 24 2024-07-26 %Q");
        let midnight = DateTime::from_unix(1_722_000_309 - 13 * 3600);
        assert_eq!(midnight.format("%I %p %-I %e"), "12 AM 12 26");
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!(leap.format("%Y-%m-%d %a %j"), "2000-02-29 Tue 060");
        assert_eq!(
            DateTime::from_unix(0).format("%c"),
            "Thu Jan  1 00:00:00 1970"
        );
    }
}
