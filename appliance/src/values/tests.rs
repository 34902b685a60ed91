//! Sources fetched for real: files, credentials and commands on this machine.

use std::time::Duration;

use super::*;
use crate::model::SecretSpec;
use crate::test_support::temp_dir;

fn settings(ttl_ms: u64, stale_ms: u64) -> SourceSettings {
    SourceSettings {
        ttl: Duration::from_millis(ttl_ms),
        max_stale: Duration::from_millis(stale_ms),
        timeout: Duration::from_secs(2),
        allow_commands: true,
        file_dirs: vec![std::env::temp_dir()],
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
    let state = live.state();
    live.ready(&state)
        .map(|ready| String::from_utf8(ready.value.expose().to_vec()).unwrap())
}

#[tokio::test]
async fn a_file_is_read_again_within_its_ttl_and_its_last_good_value_outlives_it_for_a_while() {
    let dir = temp_dir("values-file");
    let file = dir.join("key");
    std::fs::write(&file, "sk-first\n").unwrap();
    let sources = Arc::new(Sources::new(settings(300, 300)));
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
async fn a_commands_background_children_are_killed_when_it_exits() {
    let dir = temp_dir("values-background");
    let pid_file = dir.join("pid");
    let sources = Sources::new(SourceSettings {
        timeout: Duration::from_secs(30),
        ..settings(1000, 1000)
    });
    // The background sleep holds the output open: without the group kill, the fetch would
    // wait for it until the timeout and fail.
    let script = format!(
        "/bin/sleep 60 & echo $! > {}; echo sk-background",
        pid_file.display()
    );
    let value = sources
        .fetch(&ValueSource::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            script,
        ]))
        .await
        .unwrap();
    assert_eq!(value.expose(), b"sk-background");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // Gone, or a zombie waiting for init to reap it.
    while std::fs::read_to_string(&stat).is_ok_and(|stat| !stat.contains(") Z ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the background child outlived its command"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_value_is_not_used_past_its_age_even_when_the_refresher_does_not_come() {
    let dir = temp_dir("values-age");
    let file = dir.join("key");
    std::fs::write(&file, "sk-aging").unwrap();
    let sources = Arc::new(Sources::new(settings(100, 100)));
    let live = sources.live("sec_1", &spec(serde_json::json!({"valueFile": file})));
    sources.refresh_due().await;
    assert_eq!(current(&live).unwrap(), "sk-aging");
    // No refresh runs: a refresher held up by a hanging source.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = current(&live).unwrap_err();
    assert!(refused.contains("too old to use"), "{refused}");
}

#[tokio::test]
async fn value_files_are_read_only_inside_the_configured_directories() {
    let dir = temp_dir("values-directories");
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::write(allowed.join("key"), "sk-allowed").unwrap();
    let sources = Sources::new(SourceSettings {
        file_dirs: vec![allowed.clone()],
        ..settings(1000, 1000)
    });
    let fetch = |path: PathBuf| {
        let sources = &sources;
        async move { sources.fetch(&ValueSource::File(path)).await }
    };
    assert_eq!(
        fetch(allowed.join("key")).await.unwrap().expose(),
        b"sk-allowed"
    );
    for outside in ["/etc/shadow", "/proc/self/environ"] {
        let refused = fetch(PathBuf::from(outside)).await.unwrap_err().chain();
        assert!(
            refused.contains("outside the directories") && refused.contains("values.file_dirs"),
            "{refused}"
        );
    }
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
