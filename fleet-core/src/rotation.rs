//! The fleet's CAs over time, on [`Fleet`]: loading and sealing them at open, rotating the CA,
//! and re-sealing under a new key-encryption key.
//!
//! # CA rotation — the response to a leaked CA key
//!
//! Whoever holds the CA key can mint client certificates for any instance, and a *server*
//! certificate that every agent pinning the CA accepts. Rotation replaces the CA without
//! stranding a single agent:
//!
//! 1. [`Fleet::begin_ca_rotation`] creates a new CA and adds it to the trusted set. Listeners
//!    accept client certificates of both; heartbeat replies announce the new set to every agent
//!    (the agent sends the id of the set it trusts, and the reply carries the bundle while they
//!    differ), and agents add the new CA to the roots they check the server against.
//! 2. Once the agents have heartbeated (a few heartbeat intervals; [`Fleet::ca_set`] lists the
//!    set), [`Fleet::promote_ca`] makes the new CA the signing one: new enrollments and renewals
//!    are signed by it, the agent listener presents a server certificate from it, and every
//!    agent whose certificate the old CA signed is told to **renew at once** (the heartbeat reply
//!    says so), instead of at 80 % of its certificate's life.
//! 3. When every agent runs on a certificate of the new CA, [`Fleet::retire_ca`] removes the old
//!    one: certificates it signed no longer pass the handshake, and agents drop it from their
//!    roots. Join strings name the CA they pin, so tokens created before the promotion no longer
//!    enroll (after a key leak that is the point: the leaked key could impersonate the control
//!    plane to an agent pinning it); create new ones.
//!
//! Each step is one atomic store update (compare and swap), so replicas sharing a store agree;
//! other replicas pick the change up within their next upkeep ([`Fleet::reload_ca`], every
//! minute by default), which is why the steps should be minutes to days apart, not seconds.

use std::sync::Arc;
use std::time::Duration;

use crate::ca::{CaError, CaMaterial, CaSet, CertificateAuthority};
use crate::identity::Fingerprint;
use crate::seal::KeyEncryptionKey;
use crate::store::FleetStore;
use crate::{Fleet, FleetError};

/// Validity of a CA this crate generates.
pub(crate) const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Loads the store's CAs with `kek` — sealing a key kept in the clear by an earlier version —
/// or generates, seals and stores the first one. Returns the set and the material stored.
pub(crate) async fn load_or_create<S: FleetStore>(
    store: &S,
    kek: Option<&KeyEncryptionKey>,
    now: crate::Timestamp,
) -> Result<(CaSet, CaMaterial), FleetError> {
    let stored = match store.load_ca().await? {
        Some(m) if m.is_clear() => {
            // Written before keys were sealed: seal it now, or refuse to go on holding it so.
            let kek = kek.ok_or(FleetError::Ca(CaError::ClearKeyInStore))?;
            let set = CaSet::open(&m, None).map_err(FleetError::Ca)?;
            let sealed = set.seal(kek).map_err(FleetError::Ca)?;
            store.replace_ca(&m, &sealed).await?
        }
        Some(m) => m,
        None => {
            let kek = kek.ok_or(FleetError::Ca(CaError::KeyEncryptionKeyRequired))?;
            let fresh = CaSet::single(
                CertificateAuthority::generate("fleet CA", now, CA_VALIDITY)
                    .map_err(FleetError::Ca)?,
            );
            store
                .init_ca(&fresh.seal(kek).map_err(FleetError::Ca)?)
                .await?
        }
    };
    let set = CaSet::open(&stored, kek).map_err(FleetError::Ca)?;
    Ok((set, stored))
}

impl<S: FleetStore> Fleet<S> {
    /// The CA that signs client certificates now.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        Arc::clone(self.ca_set().active())
    }

    /// Every CA the fleet trusts, the signing one first (more than one during a rotation).
    pub fn ca_set(&self) -> Arc<CaSet> {
        Arc::clone(
            &self
                .inner
                .cas
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .set,
        )
    }

    /// A number that changes whenever [`ca_set`](Self::ca_set) does (cheap to poll: listeners
    /// rebuild their TLS configuration when it moves).
    pub fn ca_generation(&self) -> u64 {
        self.inner
            .ca_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn kek(&self) -> Result<KeyEncryptionKey, FleetError> {
        self.inner
            .kek
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(FleetError::Ca(CaError::KeyEncryptionKeyRequired))
    }

    fn adopt(&self, set: CaSet, material: CaMaterial) {
        let mut cas = self
            .inner
            .cas
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cas.material != material {
            cas.set = Arc::new(set);
            cas.material = material;
            self.inner
                .ca_generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Changes the stored CA set with `change`, atomically against other replicas: retried on
    /// the set another replica stored meanwhile.
    async fn change_cas(
        &self,
        change: impl Fn(&CaSet) -> Result<CaSet, FleetError>,
    ) -> Result<Arc<CaSet>, FleetError> {
        if self.inner.explicit_ca {
            return Err(FleetError::Ca(CaError::NotInStore));
        }
        let kek = self.kek()?;
        for _ in 0..8 {
            let Some(current) = self.inner.store.load_ca().await? else {
                return Err(FleetError::Ca(CaError::NotInStore));
            };
            let set = CaSet::open(&current, Some(&kek)).map_err(FleetError::Ca)?;
            let next = change(&set)?;
            let material = next.seal(&kek).map_err(FleetError::Ca)?;
            let stored = self.inner.store.replace_ca(&current, &material).await?;
            if stored == material {
                self.adopt(next, material);
                return Ok(self.ca_set());
            }
        }
        Err(FleetError::Ca(CaError::Load(
            "the stored CA kept changing under this rotation step".into(),
        )))
    }

    /// Step 1 of a rotation (see [`crate::rotation`]): a new CA, trusted beside the current one
    /// but not yet signing. Returns its fingerprint.
    pub async fn begin_ca_rotation(&self) -> Result<Fingerprint, FleetError> {
        let now = self.now();
        let set = self
            .change_cas(|set| {
                let fresh = CertificateAuthority::generate("fleet CA", now, CA_VALIDITY)
                    .map_err(FleetError::Ca)?;
                Ok(set.with_next(fresh))
            })
            .await?;
        // `with_next` puts the new CA last.
        set.all()
            .last()
            .map(|c| c.fingerprint())
            .ok_or(FleetError::Ca(CaError::NotInStore))
    }

    /// Step 2: the CA `fingerprint` (trusted already) signs from now on; the former signer stays
    /// trusted until [`retire_ca`](Self::retire_ca).
    pub async fn promote_ca(&self, fingerprint: Fingerprint) -> Result<Arc<CaSet>, FleetError> {
        self.change_cas(|set| {
            set.promoted(&fingerprint)
                .ok_or(FleetError::Ca(CaError::NotInSet(fingerprint)))
        })
        .await
    }

    /// Step 3: the CA `fingerprint` is no longer trusted: the certificates it signed are refused
    /// at the handshake. The signing CA cannot be retired.
    pub async fn retire_ca(&self, fingerprint: Fingerprint) -> Result<Arc<CaSet>, FleetError> {
        self.change_cas(|set| {
            set.retired(&fingerprint)
                .ok_or(FleetError::Ca(CaError::NotInSet(fingerprint)))
        })
        .await
    }

    /// Reads the CA set back from the store (another replica may have rotated it); cheap when
    /// nothing changed. The upkeep calls it.
    pub async fn reload_ca(&self) -> Result<(), FleetError> {
        if self.inner.explicit_ca {
            return Ok(());
        }
        let Some(stored) = self.inner.store.load_ca().await? else {
            return Ok(());
        };
        let unchanged = self
            .inner
            .cas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .material
            == stored;
        if unchanged {
            return Ok(());
        }
        let kek = self.kek()?;
        let set = CaSet::open(&stored, Some(&kek)).map_err(FleetError::Ca)?;
        self.adopt(set, stored);
        Ok(())
    }

    /// Seals the stored CA keys under `new` in one atomic store update, and uses `new` from now
    /// on (see [`crate::seal`] for rotating the key-encryption key across replicas).
    pub async fn reseal_ca(&self, new: KeyEncryptionKey) -> Result<(), FleetError> {
        let old = self.kek()?;
        if self.inner.explicit_ca {
            return Err(FleetError::Ca(CaError::NotInStore));
        }
        let Some(current) = self.inner.store.load_ca().await? else {
            return Err(FleetError::Ca(CaError::NotInStore));
        };
        let set = CaSet::open(&current, Some(&old)).map_err(FleetError::Ca)?;
        let material = set.seal(&new).map_err(FleetError::Ca)?;
        let stored = self.inner.store.replace_ca(&current, &material).await?;
        if stored != material {
            return Err(FleetError::Ca(CaError::Load(
                "the stored CA changed while it was being re-sealed; try again".into(),
            )));
        }
        *self
            .inner
            .kek
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(new);
        self.adopt(set, material);
        Ok(())
    }
}
