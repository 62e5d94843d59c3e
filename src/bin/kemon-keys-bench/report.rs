//! Collecting figures and checking them against the targets.

use std::fmt::Write as _;

/// One checked target.
#[derive(Debug, Clone)]
pub struct Check {
    pub target: String,
    pub measured: f64,
    pub bound: f64,
    /// true: measured must be >= bound; false: <= bound.
    pub at_least: bool,
}

impl Check {
    pub fn passed(&self) -> bool {
        if self.at_least {
            self.measured >= self.bound
        } else {
            self.measured <= self.bound
        }
    }
}

/// Markdown for BENCHMARKS.md, and the checks made on the way.
#[derive(Debug, Default)]
pub struct Report {
    pub markdown: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn section(&mut self, title: &str) {
        let _ = writeln!(self.markdown, "\n### {title}\n");
        println!("\n== {title}");
    }

    pub fn line(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(self.markdown, "{}", text.as_ref());
        println!("{}", text.as_ref());
    }

    /// Records a ratio check: `measured` against `bound`.
    pub fn check(&mut self, target: &str, measured: f64, at_least: bool, bound: f64) {
        let check = Check {
            target: target.to_owned(),
            measured,
            bound,
            at_least,
        };
        let verdict = if check.passed() { "PASS" } else { "MISS" };
        let op = if at_least { ">=" } else { "<=" };
        self.line(format!(
            "\n**{verdict}** {target}: {measured:.2} (target {op} {bound})"
        ));
        self.checks.push(check);
    }

    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }

    pub fn summary(&self) -> String {
        let mut s = String::from("\n| Target | Measured | Bound | Result |\n|---|---|---|---|\n");
        for c in &self.checks {
            let op = if c.at_least { ">=" } else { "<=" };
            let _ = writeln!(
                s,
                "| {} | {:.2} | {op} {} | {} |",
                c.target,
                c.measured,
                c.bound,
                if c.passed() { "pass" } else { "MISS" }
            );
        }
        s
    }
}
