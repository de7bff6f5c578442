//! Schedule rules as cachepump wrote them (robfig/cron v3 with seconds),
//! turned into firing times.
//!
//! Owns the translation from robfig's dialect to the `cron` crate's: exactly
//! six fields, `@every <duration>`, robfig's descriptors, `CRON_TZ=UTC`, days
//! of the week counted from 0 = Sunday, and classic cron's "day-of-month OR
//! day-of-week" when both are restricted. Sits below `config` (which parses
//! every rule once, at load) and `sources` (which schedules them). Must not
//! schedule anything itself.
//!
//! Times are UTC. cachepump used the process's local time zone, which is UTC
//! in the containers it ran in; other zones are refused rather than guessed.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// cachepump's rule when none is written: the top of every hour.
const DEFAULT_RULE: &str = "0 0 * * * *";

const FIELD_NAMES: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];
const FIELD_RANGES: [&str; 6] = ["0-59", "0-59", "0-23", "1-31", "1-12 or JAN-DEC", "0-7"];
const DAY_OF_WEEK: usize = 5;
const DAY_OF_MONTH: usize = 3;

/// A parsed schedule rule.
#[derive(Clone)]
pub struct Rule {
    text: String,
    kind: RuleKind,
}

#[derive(Clone)]
enum RuleKind {
    /// Fires when any of the schedules fires (two when day-of-month and
    /// day-of-week are both restricted: robfig ORs them, the crate ANDs).
    Cron(Vec<cron::Schedule>),
    /// `@every`: whole seconds, at least one, counted from the last firing
    /// (robfig), or from the Unix epoch when `aligned` (see [`Rule::aligned`]).
    Every { period: Duration, aligned: bool },
}

/// Two rules are the same when they are written the same.
impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rule({:?})", self.text)
    }
}

impl Rule {
    /// Parses a rule as cachepump accepted it; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let original = text.trim();
        let without_zone = strip_time_zone(original)?;
        let effective = if without_zone.is_empty() {
            DEFAULT_RULE
        } else {
            without_zone
        };
        let kind = if let Some(descriptor) = effective.strip_prefix('@') {
            parse_descriptor(descriptor)?
        } else {
            RuleKind::Cron(parse_fields(effective)?)
        };
        Ok(Rule {
            text: original.to_string(),
            kind,
        })
    }

    /// [`Rule::parse`], refusing a rule with no firing after `now` (a date
    /// that does not exist, such as February 30th).
    pub fn parse_firing(text: &str, now: DateTime<Utc>) -> Result<Rule, String> {
        let rule = Self::parse(text)?;
        if rule.next_after(now).is_none() {
            return Err(format!(
                "rule {:?} never fires (a date that does not exist, such as February 30th)",
                rule.text()
            ));
        }
        Ok(rule)
    }

    /// The rule as written in the config.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first firing time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            RuleKind::Cron(schedules) => schedules
                .iter()
                .filter_map(|schedule| schedule.after(&after).next())
                .min(),
            RuleKind::Every {
                period,
                aligned: false,
            } => {
                // robfig: the delay counts from the firing time truncated to the second.
                let start = after.duration_trunc(TimeDelta::seconds(1)).unwrap_or(after);
                let every = TimeDelta::from_std(*period).ok()?;
                start.checked_add_signed(every)
            }
            RuleKind::Every {
                period,
                aligned: true,
            } => {
                let period = i64::try_from(period.as_secs()).ok()?.max(1);
                let next = (after.timestamp().div_euclid(period) + 1).checked_mul(period)?;
                DateTime::from_timestamp(next, 0)
            }
        }
    }

    /// The same rule with `@every` counted from the Unix epoch rather than
    /// from the last firing, so that instances started at different times
    /// fire at the same instants (sources shared by several instances use
    /// it: the firing time is their common name for a run). Cron rules
    /// are aligned already.
    pub fn aligned(&self) -> Rule {
        let kind = match &self.kind {
            RuleKind::Every { period, .. } => RuleKind::Every {
                period: *period,
                aligned: true,
            },
            cron => cron.clone(),
        };
        Rule {
            text: self.text.clone(),
            kind,
        }
    }

    /// The latest firing at or before `now`, by the aligned reading of the
    /// rule (an unaligned `@every` has no firings of its own in the past).
    pub fn last_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            RuleKind::Cron(schedules) => {
                // `after(t).next_back()` is the last firing strictly before `t`.
                let just_after = now.checked_add_signed(TimeDelta::milliseconds(1))?;
                schedules
                    .iter()
                    .filter_map(|schedule| schedule.after(&just_after).next_back())
                    .max()
            }
            RuleKind::Every { period, .. } => {
                let period = i64::try_from(period.as_secs()).ok()?.max(1);
                let last = now.timestamp().div_euclid(period).checked_mul(period)?;
                DateTime::from_timestamp(last, 0)
            }
        }
    }
}

fn strip_time_zone(rule: &str) -> Result<&str, String> {
    let Some(rest) = rule
        .strip_prefix("CRON_TZ=")
        .or_else(|| rule.strip_prefix("TZ="))
    else {
        return Ok(rule);
    };
    let (zone, remainder) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if matches!(zone, "UTC" | "Etc/UTC" | "GMT" | "Etc/GMT") {
        Ok(remainder.trim())
    } else {
        Err(format!(
            "time zone {zone:?} is not supported: Larder evaluates rules in UTC; \
             write CRON_TZ=UTC or convert the rule's hours to UTC"
        ))
    }
}

fn parse_descriptor(descriptor: &str) -> Result<RuleKind, String> {
    if let Some(duration) = descriptor.strip_prefix("every") {
        return parse_every(duration.trim());
    }
    let fields = match descriptor {
        "yearly" | "annually" => "0 0 0 1 1 *",
        "monthly" => "0 0 0 1 * *",
        "weekly" => "0 0 0 * * 0",
        "daily" | "midnight" => "0 0 0 * * *",
        "hourly" => "0 0 * * * *",
        other => {
            return Err(format!(
                "unknown descriptor @{other} (expected @every <duration>, @hourly, @daily, \
                 @midnight, @weekly, @monthly, @yearly or @annually)"
            ));
        }
    };
    parse_fields(fields).map(RuleKind::Cron)
}

fn parse_every(text: &str) -> Result<RuleKind, String> {
    if text.is_empty() {
        return Err("@every needs a duration, e.g. \"@every 30s\"".to_string());
    }
    let duration = humantime::parse_duration(text).map_err(|e| {
        format!("@every {text:?} is not a duration ({e}); examples: 30s, 5m, 1h30m")
    })?;
    if duration.is_zero() {
        return Err(format!("@every {text:?} must be longer than zero"));
    }
    // robfig rounds down to whole seconds, with one second at least.
    let seconds = duration.as_secs().max(1);
    Ok(RuleKind::Every {
        period: Duration::from_secs(seconds),
        aligned: false,
    })
}

fn parse_fields(rule: &str) -> Result<Vec<cron::Schedule>, String> {
    let fields: Vec<&str> = rule.split_whitespace().collect();
    if fields.len() != 6 {
        return Err(format!(
            "rule {rule:?} has {} fields; it needs exactly 6: second minute hour \
             day-of-month month day-of-week (e.g. \"0 */5 * * * *\")",
            fields.len()
        ));
    }
    let mut translated: Vec<String> = fields
        .iter()
        .map(|field| {
            if *field == "?" {
                "*".to_string()
            } else {
                field.to_string()
            }
        })
        .collect();
    let day_of_week = translate_day_of_week(fields[DAY_OF_WEEK])?;
    translated[DAY_OF_WEEK] = day_of_week.crate_field.clone();
    for (index, field) in translated.iter().enumerate().take(DAY_OF_WEEK) {
        check_field(index, fields[index], field)?;
    }

    let day_of_month_is_star = is_star(fields[DAY_OF_MONTH]);
    if day_of_month_is_star || day_of_week.is_star {
        return Ok(vec![build(&translated)?]);
    }
    // Both restricted: classic cron (and robfig) fire when either matches.
    let mut by_month_day = translated.clone();
    by_month_day[DAY_OF_WEEK] = "*".to_string();
    let mut by_week_day = translated;
    by_week_day[DAY_OF_MONTH] = "*".to_string();
    Ok(vec![build(&by_month_day)?, build(&by_week_day)?])
}

/// robfig marks `*` and `?` (and `*/1`) as "any"; a step above one does not.
fn is_star(field: &str) -> bool {
    matches!(field, "*" | "?" | "*/1" | "?/1")
}

fn build(fields: &[String]) -> Result<cron::Schedule, String> {
    let expression = fields.join(" ");
    cron::Schedule::from_str(&expression).map_err(|e| format!("rule {expression:?}: {e}"))
}

/// Parses one field alone so the error names it.
fn check_field(index: usize, written: &str, translated: &str) -> Result<(), String> {
    let mut probe = ["*"; 6];
    probe[index] = translated;
    cron::Schedule::from_str(&probe.join(" "))
        .map(|_| ())
        .map_err(|_| {
            format!(
                "{} field {written:?} is not valid: use values {}, lists (1,2), ranges (1-5) \
             or steps (*/5)",
                FIELD_NAMES[index], FIELD_RANGES[index]
            )
        })
}

struct DayOfWeek {
    /// The field in the crate's numbering (1 = Sunday ... 7 = Saturday).
    crate_field: String,
    is_star: bool,
}

/// robfig counts 0 = Sunday .. 6 = Saturday (Larder also takes 7 = Sunday, as
/// classic cron does); the crate counts 1 = Sunday .. 7 = Saturday and rejects 0.
/// Each day-of-week item is expanded to the set of days it means, then written
/// out as the crate's list.
fn translate_day_of_week(field: &str) -> Result<DayOfWeek, String> {
    if is_star(field) {
        return Ok(DayOfWeek {
            crate_field: "*".to_string(),
            is_star: true,
        });
    }
    let mut days = BTreeSet::new();
    for item in field.split(',') {
        days.extend(days_of_item(item)?);
    }
    let crate_field = days
        .iter()
        .map(|day| (day + 1).to_string())
        .collect::<Vec<_>>()
        .join(",");
    Ok(DayOfWeek {
        crate_field,
        is_star: false,
    })
}

/// The days (0 = Sunday .. 6 = Saturday) one list item names.
fn days_of_item(item: &str) -> Result<Vec<u32>, String> {
    if item.is_empty() {
        return Err("day-of-week has an empty list item".to_string());
    }
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => {
            let step: u32 = step.parse().map_err(|_| {
                format!("day-of-week step {step:?} in {item:?} is not a positive number")
            })?;
            if step == 0 {
                return Err(format!("day-of-week step in {item:?} must be positive"));
            }
            (range, Some(step))
        }
        None => (item, None),
    };
    let (start, end) = if range == "*" || range == "?" {
        (0, 6)
    } else if let Some((low, high)) = range.split_once('-') {
        (day_number(low)?, day_number(high)?)
    } else {
        let start = day_number(range)?;
        // robfig: "N/step" means "N-max/step".
        let end = if step.is_some() { 6 } else { start };
        (start, end)
    };
    if start > end {
        return Err(format!(
            "day-of-week range {range:?} runs backwards (0 = Sunday ... 6 = Saturday, 7 = Sunday)"
        ));
    }
    let step = step.unwrap_or(1) as usize;
    // 7 is Sunday again: fold it onto 0 after stepping, so 5-7 means Fri, Sat, Sun.
    Ok((start..=end).step_by(step).map(|day| day % 7).collect())
}

fn day_number(text: &str) -> Result<u32, String> {
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let lower = text.to_ascii_lowercase();
    if let Some(index) = NAMES.iter().position(|name| *name == lower) {
        return Ok(index as u32);
    }
    let number: u32 = text
        .parse()
        .map_err(|_| format!("day-of-week {text:?} is neither a number 0-7 nor a name SUN-SAT"))?;
    if number > 7 {
        return Err(format!(
            "day-of-week {number} is out of range 0-7 (0 and 7 = Sunday, 6 = Saturday)"
        ));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap()
    }

    fn next(rule: &str, after: DateTime<Utc>) -> DateTime<Utc> {
        Rule::parse(rule).unwrap().next_after(after).unwrap()
    }

    fn firings(rule: &str, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let rule = Rule::parse(rule).unwrap();
        let mut out = Vec::new();
        let mut cursor = after;
        for _ in 0..count {
            cursor = rule.next_after(cursor).unwrap();
            out.push(cursor);
        }
        out
    }

    // 2026-11-21 is a Saturday.
    fn saturday_noon() -> DateTime<Utc> {
        at(2026, 11, 21, 12, 0, 0)
    }

    #[test]
    fn weekdays_one_to_five_mean_monday_to_friday() {
        let fired = firings("0 0 9 * * 1-5", saturday_noon(), 5);
        assert_eq!(fired[0], at(2026, 11, 23, 9, 0, 0));
        let days: Vec<Weekday> = fired.iter().map(|t| t.weekday()).collect();
        assert_eq!(
            days,
            [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
    }

    #[test]
    fn zero_and_seven_both_mean_sunday() {
        assert_eq!(
            next("0 0 0 * * 0", saturday_noon()),
            at(2026, 11, 22, 0, 0, 0)
        );
        assert_eq!(
            next("0 0 0 * * 7", saturday_noon()),
            at(2026, 11, 22, 0, 0, 0)
        );
        assert_eq!(
            next("0 0 0 * * SUN", saturday_noon()),
            at(2026, 11, 22, 0, 0, 0)
        );
    }

    #[test]
    fn one_means_monday_not_sunday() {
        assert_eq!(next("0 0 0 * * 1", saturday_noon()).weekday(), Weekday::Mon);
        assert_eq!(next("0 0 0 * * 6", saturday_noon()).weekday(), Weekday::Sat);
    }

    #[test]
    fn day_of_week_steps_and_lists_keep_their_meaning() {
        let weekdays = |rule: &str| -> Vec<Weekday> {
            firings(rule, saturday_noon(), 4)
                .iter()
                .map(|t| t.weekday())
                .collect()
        };
        // */2 in robfig: Sun, Tue, Thu, Sat.
        assert_eq!(
            weekdays("0 0 0 * * */2"),
            [Weekday::Sun, Weekday::Tue, Weekday::Thu, Weekday::Sat]
        );
        // 1-5/2: Mon, Wed, Fri.
        assert_eq!(
            weekdays("0 0 0 * * 1-5/2"),
            [Weekday::Mon, Weekday::Wed, Weekday::Fri, Weekday::Mon]
        );
        assert_eq!(
            weekdays("0 0 0 * * 0,3"),
            [Weekday::Sun, Weekday::Wed, Weekday::Sun, Weekday::Wed]
        );
        assert_eq!(
            weekdays("0 0 0 * * MON-FRI"),
            [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu]
        );
        assert_eq!(
            weekdays("0 0 0 * * 5-7"),
            [Weekday::Sun, Weekday::Fri, Weekday::Sat, Weekday::Sun]
        );
        // N/step means N-6/step: 3/2 is Wed, Fri.
        assert_eq!(
            weekdays("0 0 0 * * 3/2"),
            [Weekday::Wed, Weekday::Fri, Weekday::Wed, Weekday::Fri]
        );
        assert_eq!(
            weekdays("0 0 0 ? * mon"),
            [Weekday::Mon, Weekday::Mon, Weekday::Mon, Weekday::Mon]
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_both_restricted_fire_on_either() {
        // The 1st of the month OR any Monday, as robfig and classic cron do.
        let fired = firings("0 0 0 1 * 1", saturday_noon(), 3);
        assert_eq!(
            fired,
            [
                at(2026, 11, 23, 0, 0, 0), // Monday
                at(2026, 11, 30, 0, 0, 0), // Monday
                at(2026, 12, 1, 0, 0, 0),  // the 1st, a Tuesday
            ]
        );
    }

    #[test]
    fn every_counts_from_the_last_firing_in_whole_seconds() {
        let start = at(2026, 11, 21, 12, 0, 0) + TimeDelta::milliseconds(400);
        assert_eq!(next("@every 30s", start), at(2026, 11, 21, 12, 0, 30));
        assert_eq!(next("@every 1m30s", start), at(2026, 11, 21, 12, 1, 30));
        assert_eq!(next("@every 300ms", start), at(2026, 11, 21, 12, 0, 1));
    }

    #[test]
    fn descriptors_mean_what_robfig_means() {
        let after = saturday_noon();
        assert_eq!(next("@hourly", after), at(2026, 11, 21, 13, 0, 0));
        assert_eq!(next("@daily", after), at(2026, 11, 22, 0, 0, 0));
        assert_eq!(next("@midnight", after), at(2026, 11, 22, 0, 0, 0));
        assert_eq!(next("@weekly", after), at(2026, 11, 22, 0, 0, 0));
        assert_eq!(next("@monthly", after), at(2026, 12, 1, 0, 0, 0));
        assert_eq!(next("@yearly", after), at(2027, 1, 1, 0, 0, 0));
        assert_eq!(next("@annually", after), at(2027, 1, 1, 0, 0, 0));
    }

    #[test]
    fn an_empty_rule_fires_at_the_top_of_every_hour() {
        assert_eq!(
            next("", at(2026, 11, 21, 12, 30, 5)),
            at(2026, 11, 21, 13, 0, 0)
        );
        assert_eq!(
            next("  ", at(2026, 11, 21, 12, 30, 5)),
            at(2026, 11, 21, 13, 0, 0)
        );
    }

    #[test]
    fn seconds_field_is_honoured() {
        let fired = firings("*/10 * * * * *", at(2026, 11, 21, 12, 0, 1), 3);
        let seconds: Vec<u32> = fired.iter().map(|t| t.second()).collect();
        assert_eq!(seconds, [10, 20, 30]);
        assert_eq!(
            next("0 */2 * * * *", at(2026, 11, 21, 12, 1, 0)),
            at(2026, 11, 21, 12, 2, 0)
        );
    }

    #[test]
    fn cron_tz_utc_is_accepted_and_other_zones_are_refused() {
        assert_eq!(
            next("CRON_TZ=UTC 0 0 9 * * *", saturday_noon()),
            at(2026, 11, 22, 9, 0, 0)
        );
        assert_eq!(
            next("TZ=UTC @hourly", saturday_noon()),
            at(2026, 11, 21, 13, 0, 0)
        );
        let error = Rule::parse("CRON_TZ=Europe/Berlin 0 0 9 * * *").unwrap_err();
        assert!(error.contains("Europe/Berlin"), "{error}");
        assert!(error.contains("UTC"), "{error}");
    }

    #[test]
    fn five_and_seven_field_rules_are_refused() {
        let error = Rule::parse("0 9 * * 1-5").unwrap_err();
        assert!(error.contains("has 5 fields"), "{error}");
        let error = Rule::parse("0 0 9 * * 1-5 2027").unwrap_err();
        assert!(error.contains("has 7 fields"), "{error}");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            ("0 0 9 * * 8", "day-of-week 8 is out of range 0-7"),
            ("0 0 9 * * 5-2", "runs backwards"),
            ("0 0 9 * * FUNDAY", "FUNDAY"),
            ("0 0 9 * * */0", "must be positive"),
            ("0 0 25 * * *", "hour field \"25\""),
            ("0 60 * * * *", "minute field \"60\""),
            ("x * * * * *", "second field \"x\""),
            ("0 0 0 32 * *", "day-of-month field \"32\""),
            ("0 0 0 * 13 *", "month field \"13\""),
            ("@every", "needs a duration"),
            ("@every 0s", "longer than zero"),
            ("@every soon", "not a duration"),
            ("@fortnightly", "unknown descriptor @fortnightly"),
        ];
        for (rule, expected) in cases {
            let error = Rule::parse(rule).expect_err(rule);
            assert!(error.contains(expected), "{rule:?}: {error}");
        }
    }

    #[test]
    fn names_and_question_marks_are_accepted() {
        assert_eq!(
            next("0 0 0 ? JAN *", saturday_noon()),
            at(2027, 1, 1, 0, 0, 0)
        );
        assert!(Rule::parse("0 0 12 * * Mon-Fri").is_ok());
    }

    #[test]
    fn rules_that_never_fire_are_refused() {
        let now = Utc::now();
        let error = Rule::parse_firing("0 0 0 30 2 *", now).unwrap_err();
        assert!(error.contains("never fires"), "{error}");
        assert!(
            Rule::parse_firing("0 0 0 29 2 *", now).is_ok(),
            "leap days exist"
        );
        assert!(Rule::parse_firing("", now).is_ok());
    }

    #[test]
    fn aligned_rules_fire_at_the_same_instants_whenever_an_instance_starts() {
        let every = Rule::parse("@every 10s").unwrap().aligned();
        let t = at(2026, 12, 3, 10, 0, 3) + TimeDelta::milliseconds(400);
        assert_eq!(every.next_after(t), Some(at(2026, 12, 3, 10, 0, 10)));
        assert_eq!(
            every.next_after(at(2026, 12, 3, 10, 0, 10)),
            Some(at(2026, 12, 3, 10, 0, 20))
        );
        assert_eq!(every.last_at_or_before(t), Some(at(2026, 12, 3, 10, 0, 0)));
        assert_eq!(
            every.last_at_or_before(at(2026, 12, 3, 10, 0, 10)),
            Some(at(2026, 12, 3, 10, 0, 10))
        );

        let hourly = Rule::parse("0 0 * * * *").unwrap().aligned();
        assert_eq!(hourly.last_at_or_before(t), Some(at(2026, 12, 3, 10, 0, 0)));
        assert_eq!(
            hourly.last_at_or_before(at(2026, 12, 3, 9, 59, 59)),
            Some(at(2026, 12, 3, 9, 0, 0))
        );
        let seconds = Rule::parse("* * * * * *").unwrap();
        assert_eq!(
            seconds.last_at_or_before(t),
            Some(at(2026, 12, 3, 10, 0, 3))
        );
        // Day-of-month OR day-of-week: the later of the two schedules.
        let either = Rule::parse("0 0 0 1 * MON").unwrap();
        assert_eq!(
            either.last_at_or_before(at(2026, 12, 3, 10, 0, 0)),
            Some(at(2026, 12, 1, 0, 0, 0))
        );
    }
}
