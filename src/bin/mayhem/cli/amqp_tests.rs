//! Unit tests of the RabbitMQ flags: `--source amqp://...`, `amqps://` and its CA file, and
//! the publish connections.

use super::*;
use mayhem::Config;

#[test]
fn amqp_sources_parse_and_bad_ones_hide_the_password() {
    let cli = Cli::try_parse_from([
        "mayhem",
        "--source",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "--max-in-flight",
        "100000",
    ])
    .expect("an amqp url parses");
    let SourceKind::Amqp(url) = &cli.source else {
        panic!("not an amqp source: {:?}", cli.source);
    };
    // The prefetch is the window, capped at what AMQP can say.
    assert_eq!(cli.amqp_config(url, &cli.config()).prefetch, u16::MAX);
    let bad = "amqp://guest:s3cret@127.0.0.1:notaport/%2f";
    let error = Cli::try_parse_from(["mayhem", "--source", bad])
        .expect_err("a bad url is refused")
        .to_string();
    assert!(!error.contains("s3cret"), "{error}");
    assert!(error.contains("guest:***@127.0.0.1"), "{error}");
    assert!(error.contains("amqp"), "{error}");
    // A password that is part of words of the message leaves them whole ("invalid ***ort
    // number" said nothing).
    let error = Cli::try_parse_from(["mayhem", "--source", "amqp://u:p@127.0.0.1:99999/%2f"])
        .expect_err("a bad port is refused")
        .to_string();
    assert!(error.contains("invalid port number"), "{error}");
    assert!(error.contains("u:***@127.0.0.1"), "{error}");
}

#[test]
fn amqps_needs_the_tls_feature_and_a_ca_file_needs_amqps() {
    let tls = "amqps://guest:s3cret@127.0.0.1:5671/%2f";
    let parsed = Cli::try_parse_from(["mayhem", "--source", tls]);
    // Without the feature, `amqps_tests` checks the refusal.
    assert_eq!(parsed.is_ok(), cfg!(feature = "amqp-tls"));
    let error = Cli::try_parse_from(["mayhem", "--amqp-ca-file", "/nonexistent/ca.pem"])
        .expect_err("a missing CA file is refused")
        .to_string();
    assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let error = Cli::try_parse_from(["mayhem", "--amqp-ca-file", not_pem])
        .expect_err("a file without a certificate is refused")
        .to_string();
    assert!(error.contains("holds no PEM certificate"), "{error}");
    // A CA file is refused with a source that is not amqps://.
    let pem = std::env::temp_dir().join(format!("mayhem-cli-ca-{}.pem", std::process::id()));
    std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").expect("write a CA file");
    let cli = Cli::try_parse_from([
        "mayhem",
        "--source",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "--amqp-ca-file",
        pem.to_str().expect("a utf-8 path"),
    ]);
    let _ = std::fs::remove_file(&pem);
    let error = cli.expect("parses").check().expect_err("refused");
    assert!(
        error.contains("--amqp-ca-file") && error.contains("amqps://"),
        "{error}"
    );
}

#[test]
fn publish_connections_take_1_to_16_and_only_an_amqp_source() {
    for bad in ["0", "17", "two", "-1"] {
        let error = Cli::try_parse_from(["mayhem", "--amqp-publish-connections", bad])
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains(&format!("'{bad}'")) && error.contains("--amqp-publish-connections"),
            "{error}"
        );
    }
    let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let cli = Cli::try_parse_from(["mayhem", "--source", amqp]).expect("parses");
    assert_eq!(
        cli.amqp_config(amqp, &Config::default())
            .publish_connections,
        mayhem::AmqpConfig::default().publish_connections
    );
    let cli = Cli::try_parse_from([
        "mayhem",
        "--source",
        amqp,
        "--amqp-publish-connections",
        "5",
    ])
    .expect("parses");
    assert!(cli.check().is_ok());
    assert_eq!(
        cli.amqp_config(amqp, &Config::default())
            .publish_connections,
        5
    );
    let error = Cli::try_parse_from(["mayhem", "--amqp-publish-connections", "3"])
        .expect("parses")
        .check()
        .expect_err("refused without an amqp source");
    assert!(error.contains("--amqp-publish-connections"), "{error}");
}
