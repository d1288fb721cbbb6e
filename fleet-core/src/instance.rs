//! Instances: the machines in the fleet, their identity and what they report about themselves.
//!
//! An [`Instance`] is the durable record a store keeps: identity, tenant, [`SystemInfo`], tags,
//! groups, registration time and the last known state (last seen, latest metrics, installed apps).
//! The last known state is kept after an instance goes offline, for as long as the instance is
//! registered.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ca::CertificateRecord;
use crate::error::ValidationError;
use crate::{Groups, MetricsSample, Tags, TenantId, Timestamp};

/// Longest hostname accepted (the DNS limit).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Most IP addresses an instance may report.
pub const MAX_IP_ADDRESSES: usize = 32;
/// Longest OS name, OS version, architecture or agent version string.
pub const MAX_FACT_LEN: usize = 128;
/// Most installed apps an instance may report.
pub const MAX_APPS: usize = 4096;
/// Longest app name.
pub const MAX_APP_NAME_LEN: usize = 256;

/// An instance's identity: a random (version 4) UUID chosen by the control plane at registration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(Uuid);

impl InstanceId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// An id from its 16 bytes.
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(b))
    }

    /// An id from a `u128` (handy for deterministic ids in tests and benchmarks).
    pub const fn from_u128(v: u128) -> Self {
        Self(Uuid::from_u128(v))
    }

    /// The 16 bytes of the id (big-endian, so byte order is id order).
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The underlying UUID.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({})", self.0.hyphenated())
    }
}

impl FromStr for InstanceId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| ValidationError::new("instance id", s, "is not a UUID"))
    }
}

fn check_text(
    what: &'static str,
    s: &str,
    max: usize,
    allow_space: bool,
) -> Result<(), ValidationError> {
    if s.len() > max {
        return Err(ValidationError::new(what, s, "is too long"));
    }
    if s.chars()
        .any(|c| c.is_control() || (!allow_space && c.is_whitespace()))
    {
        return Err(ValidationError::new(
            what,
            s,
            if allow_space {
                "must not contain control characters"
            } else {
                "must not contain whitespace or control characters"
            },
        ));
    }
    Ok(())
}

/// What an instance reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemInfo {
    /// The machine's hostname: 1–253 characters, no whitespace or control characters.
    pub hostname: String,
    /// Its IP addresses (public or private), at most [`MAX_IP_ADDRESSES`].
    #[serde(default)]
    pub ip_addresses: Vec<IpAddr>,
    /// Operating system name, e.g. `Cloud OS` or `Debian GNU/Linux`.
    #[serde(default)]
    pub os: Option<String>,
    /// Operating system version, e.g. `12.4`.
    #[serde(default)]
    pub os_version: Option<String>,
    /// CPU architecture, e.g. `x86_64`.
    #[serde(default)]
    pub arch: Option<String>,
    /// Version of the agent software.
    #[serde(default)]
    pub agent_version: Option<String>,
}

impl SystemInfo {
    /// System info with just a hostname.
    pub fn with_hostname(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            ..Self::default()
        }
    }

    /// Checks the documented limits.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.hostname.is_empty() {
            return Err(ValidationError::new("hostname", "", "must not be empty"));
        }
        check_text("hostname", &self.hostname, MAX_HOSTNAME_LEN, false)?;
        if self.ip_addresses.len() > MAX_IP_ADDRESSES {
            return Err(ValidationError::new(
                "ip_addresses",
                format!("{} addresses", self.ip_addresses.len()),
                "exceeds the limit of 32 addresses",
            ));
        }
        for (what, v) in [
            ("os", &self.os),
            ("os_version", &self.os_version),
            ("arch", &self.arch),
            ("agent_version", &self.agent_version),
        ] {
            if let Some(v) = v {
                check_text(what, v, MAX_FACT_LEN, true)?;
            }
        }
        Ok(())
    }
}

/// An application installed or running on an instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Name, 1–256 characters without control characters.
    pub name: String,
    /// Version, if known (at most 128 characters).
    #[serde(default)]
    pub version: Option<String>,
}

/// Validates an installed-apps list: at most [`MAX_APPS`] entries with valid names and versions.
pub fn validate_apps(apps: &[App]) -> Result<(), ValidationError> {
    if apps.len() > MAX_APPS {
        return Err(ValidationError::new(
            "apps",
            format!("{} apps", apps.len()),
            "exceeds the limit of 4096 apps",
        ));
    }
    for app in apps {
        if app.name.is_empty() {
            return Err(ValidationError::new("app name", "", "must not be empty"));
        }
        check_text("app name", &app.name, MAX_APP_NAME_LEN, true)?;
        if let Some(v) = &app.version {
            check_text("app version", v, MAX_FACT_LEN, true)?;
        }
    }
    Ok(())
}

/// The durable record of a registered instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Identity.
    pub id: InstanceId,
    /// The tenant it belongs to, if any; fixed at registration.
    pub tenant: Option<TenantId>,
    /// What it reported about itself.
    pub system: SystemInfo,
    /// Operator-managed tags.
    pub tags: Tags,
    /// Groups it belongs to.
    pub groups: Groups,
    /// When it registered (server time).
    pub registered_at: Timestamp,
    /// Server time of its most recent heartbeat (registration counts as first contact).
    pub last_seen: Timestamp,
    /// Its most recent metrics sample, if it ever sent one.
    pub metrics: Option<MetricsSample>,
    /// Installed applications, as last reported.
    pub apps: Vec<App>,
    /// Its current client certificate, if it enrolled through the CA.
    #[serde(default)]
    pub certificate: Option<CertificateRecord>,
    /// A renewed certificate not yet used; it becomes current on first use.
    #[serde(default)]
    pub next_certificate: Option<CertificateRecord>,
}

impl Instance {
    /// Checks every documented limit of the record's fields.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.system.validate()?;
        validate_apps(&self.apps)?;
        if let Some(m) = &self.metrics {
            m.validate()?;
        }
        Ok(())
    }
}

/// What a trusted caller supplies to register an instance directly (see
/// [`Fleet::register`](crate::Fleet::register)).
#[derive(Debug, Clone, Default)]
pub struct NewInstance {
    /// Identity; a random one is chosen when `None`.
    pub id: Option<InstanceId>,
    /// Tenant.
    pub tenant: Option<TenantId>,
    /// System info (hostname required).
    pub system: SystemInfo,
    /// Tags.
    pub tags: Tags,
    /// Groups.
    pub groups: Groups,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_parse_and_display() {
        let id = InstanceId::from_u128(0x1234);
        let s = id.to_string();
        assert_eq!(s, "00000000-0000-0000-0000-000000001234");
        assert_eq!(s.parse::<InstanceId>().ok(), Some(id));
        assert!("nope".parse::<InstanceId>().is_err());
    }

    #[test]
    fn system_info_validation() {
        assert!(SystemInfo::with_hostname("web-01").validate().is_ok());
        assert!(SystemInfo::with_hostname("").validate().is_err());
        assert!(SystemInfo::with_hostname("a b").validate().is_err());
        assert!(SystemInfo::with_hostname("a\u{7}").validate().is_err());
        assert!(
            SystemInfo::with_hostname("h".repeat(254))
                .validate()
                .is_err()
        );
        let mut s = SystemInfo::with_hostname("x");
        s.os = Some("Debian GNU/Linux".into());
        assert!(s.validate().is_ok());
        s.ip_addresses = vec!["10.0.0.1".parse().unwrap(); 33];
        assert!(s.validate().is_err());
    }

    #[test]
    fn apps_validation() {
        assert!(
            validate_apps(&[App {
                name: "nginx".into(),
                version: Some("1.25".into())
            }])
            .is_ok()
        );
        assert!(
            validate_apps(&[App {
                name: String::new(),
                version: None
            }])
            .is_err()
        );
        let many = vec![
            App {
                name: "a".into(),
                version: None
            };
            MAX_APPS + 1
        ];
        assert!(validate_apps(&many).is_err());
    }
}
