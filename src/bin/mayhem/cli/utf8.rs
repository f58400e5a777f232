//! Naming the argument or `MAYHEM_*` variable that is not UTF-8, which clap refuses without
//! saying which.

use super::Cli;

/// Finds a command-line argument or `MAYHEM_*` variable that is not UTF-8, which clap
/// refuses without naming it (`invalid UTF-8 was detected in one or more arguments`).
///
/// # Errors
///
/// One line naming the flag or the variable; not the value, which may hold a password
/// (`--source`) and does not print anyway.
pub(crate) fn check_utf8(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), String> {
    check_utf8_for(&<Cli as clap::CommandFactory>::command(), args, env)
}

/// [`check_utf8`] for the arguments and variables of `command` (the first argument is its
/// name).
///
/// # Errors
///
/// As [`check_utf8`].
pub(crate) fn check_utf8_for(
    command: &clap::Command,
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), String> {
    let mut previous: Option<String> = None;
    for arg in args.into_iter().skip(1) {
        let Some(text) = arg.to_str() else {
            let shown = arg.to_string_lossy();
            let flag = match shown.split_once('=') {
                Some((flag, _)) if flag.starts_with("--") => flag.to_owned(),
                _ => previous
                    .filter(|flag| flag.starts_with('-'))
                    .unwrap_or_else(|| "an argument".to_owned()),
            };
            return Err(format!("invalid value for '{flag}': not valid UTF-8"));
        };
        previous = Some(text.to_owned());
    }
    for arg in command.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let Some(name) = name.to_str() else { continue };
        if env(name).is_some_and(|value| value.to_str().is_none()) {
            return Err(format!(
                "invalid value for '{name}' (the variable of '--{long}'): not valid UTF-8"
            ));
        }
    }
    Ok(())
}
