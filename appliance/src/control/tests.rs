//! The control layer over a real store and injection layer; capture is the one part that
//! needs root, so a recorder stands in for it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::injection::{Injector as _, Verdict};
use crate::model::{from_value, SecretInput, SecretView};
use crate::store::MasterKey;
use crate::test_support::temp_dir;
use crate::values::Sources;

/// Counts reconciles; intercepts nothing.
struct Recorder(Arc<AtomicUsize>);

impl Interception for Recorder {
    fn reconcile(&mut self, _agents: &[Cgroup]) -> Result<(), CaptureError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn refresh_containers(&mut self) -> Result<(), ContainerError> {
        Ok(())
    }
    fn selected(&self) -> usize {
        0
    }
    fn selected_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    fn refusals(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    fn map_entries(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }
}

struct Fixture {
    control: Control,
    injector: Arc<SecretInjector>,
    reconciles: Arc<AtomicUsize>,
}

fn open_store(dir: &Path) -> Store {
    let (key, _) = MasterKey::load_or_create(None, dir).unwrap();
    Store::open(&dir.join("store"), &key).unwrap()
}

/// Values fetched from files and commands, used for 200 ms, then kept 200 ms more while the
/// source fails.
fn test_sources() -> Arc<Sources> {
    Arc::new(Sources::new(crate::values::SourceSettings {
        ttl: std::time::Duration::from_millis(200),
        max_stale: std::time::Duration::from_millis(200),
        timeout: std::time::Duration::from_secs(5),
        allow_commands: true,
        file_dirs: vec![std::env::temp_dir()],
        onepassword: None,
        credentials_dir: None,
        own_mark: 0,
        tls: None,
    }))
}

fn fixture(dir: &Path) -> Fixture {
    let injector = Arc::new(SecretInjector::default());
    let ca = CertificateAuthority::load_or_create(&dir.join("ca")).unwrap();
    let reconciles = Arc::new(AtomicUsize::new(0));
    let control = Control::new(Parts {
        store: open_store(dir),
        injector: Arc::clone(&injector),
        leaves: Arc::new(LeafCache::new(ca, 4)),
        ca_dir: dir.join("ca"),
        events: Arc::new(EventLog::new(16)),
        capture: Box::new(Recorder(Arc::clone(&reconciles))),
        sources: test_sources(),
        trust: Arc::new(crate::trust::TrustFiles::new(dir.join("trust"))),
    });
    Fixture {
        control,
        injector,
        reconciles,
    }
}

fn secret(json: serde_json::Value) -> SecretInput {
    from_value(json).unwrap()
}

/// The authorization header the injection layer puts on a request to `host`.
fn injected(injector: &SecretInjector, host: &str, path: &str) -> Option<String> {
    let mut parts = http::Request::builder()
        .uri(path)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let readings = crate::request_path::Readings::of(parts.uri.path()).unwrap();
    match injector.prepare(host, None, &readings, &mut parts) {
        Verdict::Forward { .. } => parts
            .headers
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_owned()),
        Verdict::Block { reason } => Some(format!("blocked: {reason}")),
        Verdict::Unavailable { reason, .. } => Some(format!("unavailable: {reason}")),
    }
}

const VALUE: &str = "sk-control-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn secrets_go_live_on_create_update_and_delete() {
    let dir = temp_dir("control-live");
    let Fixture {
        control, injector, ..
    } = fixture(&dir);
    let view = control
        .create_secret(secret(
            json!({"name": "o", "type": "openai", "value": VALUE}),
        ))
        .await
        .unwrap();
    assert_eq!(view.record.preview.as_deref(), Some("sk-con••••789"));
    assert_eq!(
        injected(&injector, "api.openai.com", "/v1").as_deref(),
        Some(format!("Bearer {VALUE}").as_str())
    );
    let renamed = control
        .update_secret("o", json!({"name": "openai"}))
        .await
        .unwrap();
    assert_eq!(renamed.record.name, "openai");
    assert_eq!(renamed.record.preview, view.record.preview);
    assert_eq!(renamed.record.created_at, view.record.created_at);
    control.delete_secret("openai").unwrap();
    assert_eq!(injected(&injector, "api.openai.com", "/v1"), None);
    assert!(matches!(
        control.get_secret("openai"),
        Err(ControlError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_are_partial_and_refused_ones_change_nothing() {
    let dir = temp_dir("control-update");
    let Fixture {
        control, injector, ..
    } = fixture(&dir);
    control
        .create_secret(secret(
            json!({"name": "g", "hostPattern": "api.example.com", "value": VALUE,
            "injection": {"headerName": "authorization"}}),
        ))
        .await
        .unwrap();
    let updated = control
        .update_secret("g", json!({"pathPattern": "/v1/*"}))
        .await
        .unwrap();
    assert_eq!(
        updated.record.definition.host_pattern.as_deref(),
        Some("api.example.com")
    );
    assert_eq!(updated.rules[0].path_pattern.as_deref(), Some("/v1/*"));
    assert_eq!(
        injected(&injector, "api.example.com", "/v1/x").as_deref(),
        Some(VALUE)
    );
    assert_eq!(injected(&injector, "api.example.com", "/v2"), None);

    let field_of = |result: Result<SecretView, ControlError>| match result {
        Err(ControlError::Invalid(error)) => error.field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        field_of(control.update_secret("g", json!({})).await),
        "body"
    );
    assert_eq!(
        field_of(
            control
                .update_secret("g", json!({"hostPattern": "https://x"}))
                .await
        ),
        "hostPattern"
    );
    assert_eq!(
        field_of(control.update_secret("g", json!({"colour": "red"})).await),
        "colour"
    );
    // New rules must suit the stored value: this one would put a line break in a header.
    control
        .create_secret(secret(json!({"name": "q", "hostPattern": "q.example.com",
            "value": "a\nb", "injection": {"paramName": "key"}})))
        .await
        .unwrap();
    assert_eq!(
        field_of(
            control
                .update_secret("q", json!({"injection": {"headerName": "x-key"}}))
                .await
        ),
        "value"
    );
    assert_eq!(
        control.get_secret("g").unwrap().rules[0]
            .path_pattern
            .as_deref(),
        Some("/v1/*")
    );
    let missing = control
        .create_secret(secret(json!({"name": "c", "type": "stripe"})))
        .await
        .unwrap_err();
    assert!(matches!(missing, ControlError::Invalid(ref error) if error.field == "value"));
    let duplicate = control
        .create_secret(secret(json!({"name": "g", "type": "stripe", "value": "v"})))
        .await
        .unwrap_err();
    assert!(matches!(duplicate, ControlError::Duplicate { .. }));
}

#[tokio::test(flavor = "multi_thread")]
async fn access_rules_block_and_their_bookkeeping_is_read_only() {
    let dir = temp_dir("control-rules");
    let Fixture {
        control, injector, ..
    } = fixture(&dir);
    let rule = control
        .create_access_rule(
            from_value(json!({"host": "api.example.com", "path": "/admin/*", "action": "block"}))
                .unwrap(),
        )
        .unwrap();
    let blocked = injected(&injector, "api.example.com", "/admin/users").unwrap();
    assert!(blocked.contains(&rule.id), "{blocked}");
    let refused = control
        .update_access_rule(&rule.id, json!({"id": "other"}))
        .unwrap_err();
    assert!(matches!(refused, ControlError::Invalid(ref error) if error.field == "id"));
    control
        .update_access_rule(&rule.id, json!({"action": "allow"}))
        .unwrap();
    assert_eq!(injected(&injector, "api.example.com", "/admin/users"), None);
    control.delete_access_rule(&rule.id).unwrap();
    assert!(control.list_access_rules().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_record_that_no_longer_validates_is_named_at_reload() {
    let dir = temp_dir("control-damaged");
    let Fixture {
        control,
        reconciles,
        ..
    } = fixture(&dir);
    let view = control
        .create_secret(secret(
            json!({"name": "o", "type": "openai", "value": VALUE}),
        ))
        .await
        .unwrap();
    assert_eq!(control.reload().unwrap().secrets, 1);
    assert_eq!(reconciles.load(Ordering::Relaxed), 1);
    drop(control);
    // As an older appliance might have accepted it: both shortcut names at once.
    let store = open_store(&dir);
    let mut record = store.get_secret("o").unwrap();
    record.definition.provider = Some(crate::model::Provider::Stripe);
    store
        .replace_secret("o", &record, crate::store::ValueChange::Keep)
        .unwrap();
    drop(store);
    let error = fixture(&dir).control.reload().unwrap_err();
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(message.contains(&view.record.id), "{message}");
    assert!(
        message.contains("type: give either type or provider"),
        "{message}"
    );
}
