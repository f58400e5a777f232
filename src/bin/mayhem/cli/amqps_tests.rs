//! Whatever the features, `amqps://` says which feature it needs when the build lacks it.

use super::*;

#[test]
fn amqps_names_the_feature_it_needs_and_hides_the_password() {
    let error = Cli::try_parse_from([
        "mayhem",
        "--source",
        "amqps://guest:s3cret@127.0.0.1:5671/%2f",
    ])
    .expect_err("amqps is refused without the feature")
    .to_string();
    assert!(!error.contains("s3cret"), "{error}");
    assert!(error.contains("guest:***@127.0.0.1"), "{error}");
    assert!(error.contains("cargo feature amqp-tls"), "{error}");
    assert_eq!(error.trim_end().lines().count(), 1, "{error}");
}
