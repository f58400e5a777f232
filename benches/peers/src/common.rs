//! What both peers share: their flags, the handling of a message, and the CPU time.

use std::collections::HashMap;
use std::str::FromStr;

/// `--name value` flags.
pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse() -> Result<Args, String> {
        let mut flags = HashMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let name = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag}"))?;
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            flags.insert(name.to_owned(), value);
        }
        Ok(Args(flags))
    }

    pub fn take(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    pub fn required(&mut self, name: &str) -> Result<String, String> {
        self.take(name)
            .ok_or_else(|| format!("--{name} is required"))
    }

    pub fn number<T: FromStr>(&mut self, name: &str, default: Option<T>) -> Result<T, String> {
        match (self.take(name), default) {
            (Some(text), _) => text
                .replace(['_', ','], "")
                .parse()
                .map_err(|_| format!("--{name} {text}: not a number")),
            (None, Some(default)) => Ok(default),
            (None, None) => Err(format!("--{name} is required")),
        }
    }

    /// Refuses flags nobody took.
    pub fn finish(self) -> Result<(), String> {
        match self.0.keys().next() {
            Some(name) => Err(format!("unknown flag --{name}")),
            None => Ok(()),
        }
    }
}

/// The handler: reads every byte of the message's data, as one that decodes it would.
#[inline]
pub fn handle(data: &[u8]) {
    let sum = data.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
    std::hint::black_box(sum);
}

/// User and system CPU time of this process so far, in microseconds (getrusage).
pub fn cpu_micros() -> u64 {
    // SAFETY: getrusage writes the struct it is given, which is plain data.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}
