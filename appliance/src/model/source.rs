//! Where a secret's value comes from: inline (sealed in the store), or fetched by the daemon
//! from 1Password, a file, a command or a systemd credential. OneCLI's names (`valueSource`,
//! `opRef`) are the API's.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::invalid;
use super::ValidationError;

/// The kinds of value source, as the API names them in `valueSource`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `value`, sealed in the store.
    #[default]
    Inline,
    /// `opRef`, fetched from 1Password Connect.
    Onepassword,
    /// `valueFile`, read by the daemon.
    File,
    /// `valueCommand`, run by the daemon; its standard output is the value.
    Command,
    /// `valueCredential`, a systemd credential of the daemon's service.
    Credential,
}

impl SourceKind {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::Onepassword => "onepassword",
            Self::File => "file",
            Self::Command => "command",
            Self::Credential => "credential",
        }
    }

    /// The field that carries this source.
    pub fn field(self) -> &'static str {
        match self {
            Self::Inline => "value",
            Self::Onepassword => "opRef",
            Self::File => "valueFile",
            Self::Command => "valueCommand",
            Self::Credential => "valueCredential",
        }
    }
}

/// A 1Password secret reference, `op://<vault>/<item>/[<section>/]<field>`. Vault and item
/// are names or ids; section and field are labels or ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpRef {
    /// Vault name or id.
    pub vault: String,
    /// Item title or id.
    pub item: String,
    /// Section label or id, when the field is in one.
    pub section: Option<String>,
    /// Field label or id.
    pub field: String,
}

impl OpRef {
    /// Parses a reference; the error says what it must look like.
    pub fn parse(text: &str) -> Result<Self, String> {
        const SHAPE: &str = "must look like op://<vault>/<item>/[<section>/]<field>, such as op://Engineering/OpenAI/credential";
        let rest = text.strip_prefix("op://").ok_or_else(|| SHAPE.to_owned())?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|part| part.trim().is_empty()) {
            return Err(format!("{SHAPE} (a part is empty)"));
        }
        let owned = |part: &str| part.to_owned();
        match parts.as_slice() {
            [vault, item, field] => Ok(Self {
                vault: owned(vault),
                item: owned(item),
                section: None,
                field: owned(field),
            }),
            [vault, item, section, field] => Ok(Self {
                vault: owned(vault),
                item: owned(item),
                section: Some(owned(section)),
                field: owned(field),
            }),
            _ => Err(SHAPE.to_owned()),
        }
    }
}

impl fmt::Display for OpRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op://{}/{}/", self.vault, self.item)?;
        if let Some(section) = &self.section {
            write!(f, "{section}/")?;
        }
        f.write_str(&self.field)
    }
}

/// Where a validated secret's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueSource {
    /// Sealed in the store.
    Inline,
    /// A 1Password item's field, through Connect.
    OnePassword(OpRef),
    /// A file's contents (a trailing newline dropped).
    File(PathBuf),
    /// A command's standard output (a trailing newline dropped): the program (an absolute
    /// path) and its arguments.
    Command(Vec<String>),
    /// A systemd credential of the daemon's service, by name.
    Credential(String),
}

impl ValueSource {
    /// Its kind.
    pub fn kind(&self) -> SourceKind {
        match self {
            Self::Inline => SourceKind::Inline,
            Self::OnePassword(_) => SourceKind::Onepassword,
            Self::File(_) => SourceKind::File,
            Self::Command(_) => SourceKind::Command,
            Self::Credential(_) => SourceKind::Credential,
        }
    }

    /// How it is named in logs, errors and `appliance secret check`: never a value.
    pub fn describe(&self) -> String {
        match self {
            Self::Inline => "the store".into(),
            Self::OnePassword(reference) => format!("1Password {reference}"),
            Self::File(path) => format!("file {}", path.display()),
            Self::Command(argv) => format!("command {}", argv[0]),
            Self::Credential(name) => format!("systemd credential {name}"),
        }
    }
}

/// The source fields of a secret's input, checked together: at most one is given, and
/// `valueSource`, when given, names it.
pub(super) struct SourceFields<'a> {
    pub kind: Option<SourceKind>,
    pub value_given: bool,
    pub op_ref: Option<&'a str>,
    pub file: Option<&'a str>,
    pub command: Option<&'a [String]>,
    pub credential: Option<&'a str>,
}

impl SourceFields<'_> {
    pub fn validate(&self) -> Result<ValueSource, ValidationError> {
        let given: Vec<SourceKind> = [
            (SourceKind::Inline, self.value_given),
            (SourceKind::Onepassword, self.op_ref.is_some()),
            (SourceKind::File, self.file.is_some()),
            (SourceKind::Command, self.command.is_some()),
            (SourceKind::Credential, self.credential.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, given)| given.then_some(kind))
        .collect();
        let kind = match (given.as_slice(), self.kind) {
            ([_, second, ..], _) => {
                return Err(invalid(
                    second.field(),
                    format!(
                        "gives a second value source beside {}; give one of value, opRef, valueFile, valueCommand and valueCredential (in an update, set the old one to null)",
                        given[0].field()
                    ),
                ))
            }
            ([one], Some(named)) if *one != named => {
                return Err(invalid(
                    "valueSource",
                    format!(
                        "is {} but {} is given; give {} or leave valueSource out",
                        named.as_str(),
                        one.field(),
                        named.field()
                    ),
                ))
            }
            ([one], _) => *one,
            ([], Some(named)) if named != SourceKind::Inline => {
                return Err(invalid(
                    named.field(),
                    format!("is required with valueSource {}", named.as_str()),
                ))
            }
            ([], _) => SourceKind::Inline,
        };
        Ok(match kind {
            SourceKind::Inline => ValueSource::Inline,
            SourceKind::Onepassword => ValueSource::OnePassword(
                OpRef::parse(self.op_ref.unwrap_or_default())
                    .map_err(|message| invalid("opRef", message))?,
            ),
            SourceKind::File => {
                let path = Path::new(self.file.unwrap_or_default());
                if !path.is_absolute() {
                    return Err(invalid(
                        "valueFile",
                        "must be an absolute path (the daemon reads it, from its own working directory)",
                    ));
                }
                ValueSource::File(path.to_path_buf())
            }
            SourceKind::Command => {
                let argv = self.command.unwrap_or_default();
                let Some(program) = argv.first() else {
                    return Err(invalid(
                        "valueCommand",
                        "must list the program and its arguments, such as [\"/usr/bin/pass\", \"show\", \"openai\"]",
                    ));
                };
                if !Path::new(program).is_absolute() {
                    return Err(invalid(
                        "valueCommand[0]",
                        "must be an absolute path: the daemon runs it without a shell or PATH",
                    ));
                }
                if let Some(index) = argv.iter().position(|arg| arg.contains('\0')) {
                    return Err(invalid(
                        format!("valueCommand[{index}]"),
                        "must not contain NUL",
                    ));
                }
                ValueSource::Command(argv.to_vec())
            }
            SourceKind::Credential => {
                let name = self.credential.unwrap_or_default();
                if name.is_empty()
                    || name.len() > 255
                    || name.contains('/')
                    || name == "."
                    || name == ".."
                {
                    return Err(invalid(
                        "valueCredential",
                        "must be a systemd credential name (1-255 characters, no `/`), as in LoadCredential=NAME:PATH",
                    ));
                }
                ValueSource::Credential(name.to_owned())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_and_without_a_section_and_print_back() {
        let plain = OpRef::parse("op://Engineering/OpenAI/credential").unwrap();
        assert_eq!(plain.section, None);
        assert_eq!(plain.to_string(), "op://Engineering/OpenAI/credential");
        let sectioned = OpRef::parse("op://vault/item/API/key").unwrap();
        assert_eq!(sectioned.section.as_deref(), Some("API"));
        assert_eq!(sectioned.field, "key");
        for bad in [
            "Engineering/OpenAI/credential",
            "op://vault/item",
            "op://vault//field",
            "op://a/b/c/d/e",
            "op:// /b/c",
        ] {
            assert!(OpRef::parse(bad).is_err(), "{bad}");
        }
    }
}
