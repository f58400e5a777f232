//! Unit tests of the command line: arguments that are not UTF-8, and the defaults.

use super::*;
use mayhem::Config;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

#[test]
fn arguments_and_variables_that_are_not_utf8_are_named() {
    let bad = || OsString::from_vec(vec![b'a', 0xff]);
    let args = |rest: Vec<OsString>| {
        std::iter::once(OsString::from("mayhem"))
            .chain(rest)
            .collect::<Vec<_>>()
    };
    let none = |_: &str| None;
    assert_eq!(
        check_utf8(args(vec!["--stream".into(), bad()]), none),
        Err("invalid value for '--stream': not valid UTF-8".to_owned())
    );
    // A password in `--source` is never shown.
    let mut joined = OsString::from("--source=amqp://user:s3cret");
    joined.push(bad());
    let error = check_utf8(args(vec![joined]), none).expect_err("refused");
    assert_eq!(error, "invalid value for '--source': not valid UTF-8");
    let error = check_utf8(args(vec![]), |name| {
        (name == "MAYHEM_CONSUMER_NAME").then(bad)
    })
    .expect_err("refused");
    assert!(
        error.contains("'MAYHEM_CONSUMER_NAME' (the variable of '--consumer-name')"),
        "{error}"
    );
    assert_eq!(
        check_utf8(args(vec!["--stream".into(), "x".into()]), none),
        Ok(())
    );
}

#[test]
fn the_command_line_defaults_are_the_library_defaults() {
    // Parsed without flags and with no MAYHEM_* variable that would stand for one (the
    // test harness's own variables, MAYHEM_REQUIRE_* and the like, stand for none).
    let harness = |key: &str| {
        key.starts_with("MAYHEM_REQUIRE_")
            || key.starts_with("MAYHEM_BENCH")
            || key == "MAYHEM_PUBSUB_PYTHON"
    };
    if std::env::vars().any(|(key, _)| key.starts_with("MAYHEM_") && !harness(&key)) {
        panic!("a MAYHEM_* variable is set: this test needs the defaults");
    }
    let cli = Cli::try_parse_from(["mayhem"]).expect("no flags parse");
    let mut config = cli.config();
    // The seed is drawn when not given.
    assert!(config.run.seed.is_some());
    config.run.seed = None;
    assert_eq!(config, Config::default());
}
