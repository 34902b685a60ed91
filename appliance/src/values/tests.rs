//! Sources fetched for real: files, credentials and commands on this machine.

use std::time::Duration;

use super::*;
use crate::injection::ValueState;
use crate::model::SecretSpec;
use crate::test_support::temp_dir;

fn settings(ttl_ms: u64, stale_ms: u64) -> SourceSettings {
    SourceSettings {
        ttl: Duration::from_millis(ttl_ms),
        max_stale: Duration::from_millis(stale_ms),
        timeout: Duration::from_secs(2),
        allow_commands: true,
        onepassword: None,
        credentials_dir: None,
        own_mark: 0,
        tls: None,
    }
}

fn spec(source: serde_json::Value) -> SecretSpec {
    let mut json = serde_json::json!({"name": "s", "type": "openai"});
    json.as_object_mut()
        .unwrap()
        .extend(source.as_object().unwrap().clone());
    SecretSpec::from_json(&json).unwrap().0
}

fn current(live: &LiveValue) -> Result<String, String> {
    match &*live.state() {
        ValueState::Ready(ready) => Ok(String::from_utf8(ready.value.expose().to_vec()).unwrap()),
        state => Err(live.unavailable(state).unwrap()),
    }
}

#[tokio::test]
async fn a_file_is_read_again_within_its_ttl_and_its_last_good_value_outlives_it_for_a_while() {
    let dir = temp_dir("values-file");
    let file = dir.join("key");
    std::fs::write(&file, "sk-first\n").unwrap();
    let sources = Sources::new(settings(300, 300));
    let spec = spec(serde_json::json!({"valueFile": file}));
    let live = sources.live("sec_1", &spec);
    assert!(current(&live).unwrap_err().contains("not been fetched"));
    sources.refresh_due().await;
    assert_eq!(current(&live).unwrap(), "sk-first");

    std::fs::write(&file, "sk-second").unwrap();
    sources.refresh_due().await;
    assert_eq!(
        current(&live).unwrap(),
        "sk-first",
        "refreshed before it was due"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    sources.refresh_due().await;
    assert_eq!(current(&live).unwrap(), "sk-second");

    // A rebuilt host table starts from the cached value.
    let rebuilt = sources.live("sec_1", &spec);
    assert_eq!(current(&rebuilt).unwrap(), "sk-second");

    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    sources.refresh_due().await;
    assert_eq!(
        current(&rebuilt).unwrap(),
        "sk-second",
        "the last good value is kept"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    sources.refresh_due().await;
    let failed = current(&rebuilt).unwrap_err();
    assert!(failed.contains(&file.display().to_string()), "{failed}");
    assert!(failed.contains("No such file"), "{failed}");
    assert!(!failed.contains("sk-second"));

    std::fs::write(&file, "sk-third").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sources.refresh_due().await;
    assert_eq!(current(&rebuilt).unwrap(), "sk-third", "it recovers");
}

#[tokio::test]
async fn commands_run_without_a_shell_or_the_daemons_environment() {
    let dir = temp_dir("values-command");
    let script = dir.join("print-key");
    // The daemon's environment (OP_CONNECT_TOKEN and the like) must not reach commands.
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf 'sk-from-%s-%s\\n' \"$1\" \"${APPLIANCE_TEST_SECRET_ENV:-clean}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::env::set_var("APPLIANCE_TEST_SECRET_ENV", "leaked");
    let sources = Sources::new(settings(1000, 1000));
    let run = |argv: Vec<String>| {
        let sources = &sources;
        async move { sources.fetch(&ValueSource::Command(argv)).await }
    };
    let value = run(vec![script.display().to_string(), "command".into()])
        .await
        .unwrap();
    assert_eq!(value.expose(), b"sk-from-command-clean");
    let failed = run(vec!["/bin/false".into()]).await.unwrap_err();
    assert!(failed.chain().contains("exited with"), "{}", failed.chain());
    let silent = run(vec!["/bin/true".into()]).await.unwrap_err();
    assert!(silent.chain().contains("is empty"), "{}", silent.chain());
    let slow = Sources::new(SourceSettings {
        timeout: Duration::from_millis(200),
        ..settings(1000, 1000)
    });
    let started = std::time::Instant::now();
    let timed_out = slow
        .fetch(&ValueSource::Command(vec!["/bin/sleep".into(), "5".into()]))
        .await
        .unwrap_err();
    assert!(
        timed_out.chain().contains("killed"),
        "{}",
        timed_out.chain()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let disabled = Sources::new(SourceSettings {
        allow_commands: false,
        ..settings(1000, 1000)
    });
    assert!(matches!(
        disabled
            .fetch(&ValueSource::Command(vec!["/bin/true".into()]))
            .await,
        Err(SourceError::CommandsDisabled)
    ));
}

#[tokio::test]
async fn credentials_come_from_the_daemons_credentials_directory() {
    let dir = temp_dir("values-credential");
    std::fs::write(dir.join("openai-key"), "sk-credential").unwrap();
    let without = Sources::new(settings(1000, 1000));
    let credential = ValueSource::Credential("openai-key".into());
    assert!(matches!(
        without.fetch(&credential).await,
        Err(SourceError::NoCredentials)
    ));
    let with = Sources::new(SourceSettings {
        credentials_dir: Some(dir.clone()),
        ..settings(1000, 1000)
    });
    assert_eq!(
        with.fetch(&credential).await.unwrap().expose(),
        b"sk-credential"
    );
    let missing = with
        .fetch(&ValueSource::Credential("other".into()))
        .await
        .unwrap_err();
    assert!(missing.chain().contains("other"), "{}", missing.chain());
}
