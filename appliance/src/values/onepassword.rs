//! The `onepassword` source: a field of a 1Password item, read through a 1Password Connect
//! server's REST API (list vaults, list items, get item), as its SDKs do: the server's URL
//! (`OP_CONNECT_HOST`) and a bearer token (`OP_CONNECT_TOKEN`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::addr::UpstreamAddr;
use crate::client::percent_encode as encode;
use crate::model::OpRef;
use crate::proxy::upstream::connect_marked;

/// Largest answer read from Connect.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Where Connect is and how to authenticate.
#[derive(Clone)]
pub struct ConnectSettings {
    /// `http://host:port` or `https://host[:port]`, optionally with a path prefix.
    pub host: Uri,
    /// The Connect token.
    pub token: Arc<Zeroizing<String>>,
}

impl std::fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("host", &self.host)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Why Connect gave no value.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server could not be reached.
    #[error("cannot reach 1Password Connect at {host}: {reason}")]
    Unreachable {
        /// The server.
        host: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("1Password Connect answered {status} to {what}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// What was asked.
        what: String,
        /// Its message.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("1Password Connect's answer to {what} is not what its API documents: {reason}")]
    Protocol {
        /// What was asked.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// No vault has this name or id.
    #[error("no vault named {0:?} is shared with this Connect token")]
    NoVault(String),
    /// No item has this title or id in the vault.
    #[error("no item titled {item:?} in vault {vault:?}")]
    NoItem {
        /// The vault.
        vault: String,
        /// The item.
        item: String,
    },
    /// The item has no such field.
    #[error("item {item:?} has no field {field:?}{}", section.as_ref().map(|section| format!(" in section {section:?}")).unwrap_or_default())]
    NoField {
        /// The item.
        item: String,
        /// The section, if the reference names one.
        section: Option<String>,
        /// The field.
        field: String,
    },
    /// Several fields match.
    #[error("item {item:?} has {count} fields labelled {field:?}; name the section in the reference (op://vault/item/section/field)")]
    Ambiguous {
        /// The item.
        item: String,
        /// The field.
        field: String,
        /// How many match.
        count: usize,
    },
    /// The field holds nothing.
    #[error("field {field:?} of item {item:?} is empty")]
    EmptyField {
        /// The item.
        item: String,
        /// The field.
        field: String,
    },
}

#[derive(Deserialize)]
struct Vault {
    id: String,
}

#[derive(Deserialize)]
struct ItemSummary {
    id: String,
}

#[derive(Deserialize)]
struct SectionRef {
    id: String,
}

#[derive(Deserialize)]
struct Section {
    id: String,
    #[serde(default)]
    label: Option<String>,
}

#[derive(Deserialize)]
struct Field {
    id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    value: Option<Zeroizing<String>>,
    #[serde(default)]
    section: Option<SectionRef>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    fields: Vec<Field>,
    #[serde(default)]
    sections: Vec<Section>,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// A Connect client.
pub struct Connect {
    settings: ConnectSettings,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    mark: u32,
}

/// Vault and item ids are 26 lower-case letters and digits.
fn looks_like_id(text: &str) -> bool {
    text.len() == 26
        && text
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
}

/// A SCIM `eq` filter on `attribute`, quoted as the API expects.
fn eq_filter(attribute: &str, value: &str) -> String {
    let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
    encode(&format!("{attribute} eq \"{quoted}\""))
}

/// The one field of `item` that `reference` names.
fn pick_field(item: Item, reference: &OpRef) -> Result<Zeroizing<String>, ConnectError> {
    let matches_name = |id: &str, label: Option<&str>, wanted: &str| {
        id == wanted || label.is_some_and(|label| label == wanted)
    };
    let section_id = match &reference.section {
        None => None,
        Some(wanted) => Some(
            item.sections
                .iter()
                .find(|section| matches_name(&section.id, section.label.as_deref(), wanted))
                .map(|section| section.id.clone())
                .ok_or_else(|| ConnectError::NoField {
                    item: reference.item.clone(),
                    section: reference.section.clone(),
                    field: reference.field.clone(),
                })?,
        ),
    };
    let mut found: Vec<Field> = item
        .fields
        .into_iter()
        .filter(|field| matches_name(&field.id, field.label.as_deref(), &reference.field))
        .filter(|field| {
            section_id.as_ref().is_none_or(|wanted| {
                field
                    .section
                    .as_ref()
                    .is_some_and(|section| &section.id == wanted)
            })
        })
        .collect();
    match found.len() {
        0 => Err(ConnectError::NoField {
            item: reference.item.clone(),
            section: reference.section.clone(),
            field: reference.field.clone(),
        }),
        1 => found
            .pop()
            .and_then(|field| field.value)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| ConnectError::EmptyField {
                item: reference.item.clone(),
                field: reference.field.clone(),
            }),
        count => Err(ConnectError::Ambiguous {
            item: reference.item.clone(),
            field: reference.field.clone(),
            count,
        }),
    }
}

impl Connect {
    /// A client for `settings`; `tls` verifies `https://` servers.
    pub fn new(
        settings: ConnectSettings,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
        mark: u32,
    ) -> Self {
        Self {
            settings,
            tls,
            timeout,
            mark,
        }
    }

    fn unreachable(&self, reason: impl ToString) -> ConnectError {
        ConnectError::Unreachable {
            host: self.settings.host.to_string(),
            reason: reason.to_string(),
        }
    }

    /// `GET <host><path>` with the token; the JSON answer read as `T`. A 404 is `None`.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<Option<T>, ConnectError> {
        tokio::time::timeout(self.timeout, self.exchange(path, what))
            .await
            .map_err(|_| {
                self.unreachable(format!("no answer within {} s", self.timeout.as_secs()))
            })?
    }

    async fn exchange<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<Option<T>, ConnectError> {
        let host = &self.settings.host;
        let https = host.scheme_str() == Some("https");
        let authority = host
            .authority()
            .ok_or_else(|| self.unreachable("the URL has no host"))?;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let address = tokio::net::lookup_host((authority.host(), port))
            .await
            .map_err(|error| self.unreachable(error))?
            .next()
            .ok_or_else(|| self.unreachable("the name resolves to no address"))?;
        let stream = connect_marked(UpstreamAddr(address), self.mark, self.timeout)
            .await
            .map_err(|error| self.unreachable(error))?;
        let prefix = host.path().trim_end_matches('/');
        let request = Request::get(format!("{prefix}{path}"))
            .header(header::HOST, authority.as_str())
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.settings.token.as_str()),
            )
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|error| self.unreachable(error))?;
        let response = if https {
            let tls = self
                .tls
                .clone()
                .ok_or_else(|| self.unreachable("no TLS trust is configured"))?;
            let name = rustls_pki_types::ServerName::try_from(authority.host().to_owned())
                .map_err(|error| self.unreachable(error))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, stream)
                .await
                .map_err(|error| self.unreachable(error))?;
            send(TokioIo::new(stream), request).await
        } else {
            send(TokioIo::new(stream), request).await
        }
        .map_err(|error| self.unreachable(error))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| self.unreachable(error))?
            .to_bytes();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|error| error.message)
                .unwrap_or_else(|_| "(no message)".into());
            return Err(ConnectError::Api {
                status,
                what: what.into(),
                message,
            });
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|error| ConnectError::Protocol {
                what: what.into(),
                reason: error.to_string(),
            })
    }

    async fn vault_id(&self, vault: &str) -> Result<String, ConnectError> {
        let what = format!("the vault list filtered by name {vault:?}");
        let listed: Vec<Vault> = self
            .get(
                &format!("/v1/vaults?filter={}", eq_filter("name", vault)),
                &what,
            )
            .await?
            .unwrap_or_default();
        if let Some(found) = listed.into_iter().next() {
            return Ok(found.id);
        }
        if looks_like_id(vault) {
            let what = format!("vault {vault}");
            if let Some(found) = self
                .get::<Vault>(&format!("/v1/vaults/{}", encode(vault)), &what)
                .await?
            {
                return Ok(found.id);
            }
        }
        Err(ConnectError::NoVault(vault.into()))
    }

    async fn item_id(&self, vault_id: &str, reference: &OpRef) -> Result<String, ConnectError> {
        let item = &reference.item;
        let what = format!(
            "the item list of vault {:?} filtered by title {item:?}",
            reference.vault
        );
        let listed: Vec<ItemSummary> = self
            .get(
                &format!(
                    "/v1/vaults/{}/items?filter={}",
                    encode(vault_id),
                    eq_filter("title", item)
                ),
                &what,
            )
            .await?
            .unwrap_or_default();
        if let Some(found) = listed.into_iter().next() {
            return Ok(found.id);
        }
        if looks_like_id(item) {
            return Ok(item.clone());
        }
        Err(ConnectError::NoItem {
            vault: reference.vault.clone(),
            item: item.clone(),
        })
    }

    /// The value of the field `reference` names.
    pub async fn resolve(&self, reference: &OpRef) -> Result<Zeroizing<String>, ConnectError> {
        let vault_id = self.vault_id(&reference.vault).await?;
        let item_id = self.item_id(&vault_id, reference).await?;
        let what = format!("item {:?}", reference.item);
        let item: Item = self
            .get(
                &format!(
                    "/v1/vaults/{}/items/{}",
                    encode(&vault_id),
                    encode(&item_id)
                ),
                &what,
            )
            .await?
            .ok_or_else(|| ConnectError::NoItem {
                vault: reference.vault.clone(),
                item: reference.item.clone(),
            })?;
        pick_field(item, reference)
    }
}

async fn send<S>(
    io: TokioIo<S>,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(json: serde_json::Value) -> Item {
        serde_json::from_value(json).unwrap()
    }

    fn reference(text: &str) -> OpRef {
        OpRef::parse(text).unwrap()
    }

    #[test]
    fn fields_are_picked_by_label_or_id_within_their_section() {
        let sectioned = || {
            item(serde_json::json!({
                "sections": [{"id": "s1", "label": "Prod"}, {"id": "s2", "label": "Staging"}],
                "fields": [
                    {"id": "f1", "label": "key", "value": "prod-key", "section": {"id": "s1"}},
                    {"id": "f2", "label": "key", "value": "staging-key", "section": {"id": "s2"}},
                    {"id": "password", "label": "password", "value": "pw"},
                    {"id": "f4", "label": "empty", "value": ""},
                ]
            }))
        };
        let pick = |text: &str| pick_field(sectioned(), &reference(text));
        assert_eq!(pick("op://v/i/Prod/key").unwrap().as_str(), "prod-key");
        assert_eq!(pick("op://v/i/s2/f2").unwrap().as_str(), "staging-key");
        assert_eq!(pick("op://v/i/password").unwrap().as_str(), "pw");
        assert!(matches!(
            pick("op://v/i/key"),
            Err(ConnectError::Ambiguous { count: 2, .. })
        ));
        assert!(matches!(
            pick("op://v/i/Dev/key"),
            Err(ConnectError::NoField { .. })
        ));
        assert!(matches!(
            pick("op://v/i/nothing"),
            Err(ConnectError::NoField { .. })
        ));
        assert!(matches!(
            pick("op://v/i/empty"),
            Err(ConnectError::EmptyField { .. })
        ));
    }

    #[test]
    fn filters_are_quoted_and_encoded() {
        assert_eq!(
            eq_filter("name", "Team \"A\""),
            "name%20eq%20%22Team%20%5C%22A%5C%22%22"
        );
        assert!(looks_like_id("abcdefghijklmnopqrstuvwxyz"));
        assert!(!looks_like_id("Engineering"));
    }
}
