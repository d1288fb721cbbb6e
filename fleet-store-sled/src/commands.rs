//! The command queue and the compliance policies on sled trees.
//!
//! `commands` holds each command by its (time-ordered) id; `commands_by_instance` and
//! `commands_by_batch` index it for listing; `commands_open` lists each instance's queued and
//! delivered commands, so a delivery reads only those; `command_keys` maps an instance's
//! idempotency key to its command. Every change runs in one sled transaction over the record
//! and its indexes (sled serializes transactions, so a read-check-write inside one is atomic) and
//! is flushed before returning.

use std::time::Duration;

use async_trait::async_trait;
use fleet_core::command::{
    Command, CommandId, CommandOutcome, CommandQuery, CommandResult, Delivery, Enqueued,
};
use fleet_core::error::RecordKind;
use fleet_core::policy::{Policy, PolicyName};
use fleet_core::store::{ChangeKind, CommandStore, PolicyStore, StoreResult};
use fleet_core::{InstanceId, StoreError, Timestamp};
use sled::Transactional;
use sled::transaction::TransactionalTree;

use crate::codec::encode;
use crate::store::{TxResult, abort, append_change, backend, finish, tx};
use crate::{SledStore, decode_at};

fn pair(a: &[u8; 16], b: &[u8; 16]) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(a);
    k[16..].copy_from_slice(b);
    k
}

fn key_of(instance: InstanceId, key: &str) -> Vec<u8> {
    let mut k = instance.as_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn not_found(id: CommandId) -> StoreError {
    StoreError::NotFound {
        kind: RecordKind::Command,
        id: id.to_string(),
    }
}

fn get_tx(commands: &TransactionalTree, id: CommandId) -> TxResult<Option<Command>> {
    match commands.get(id.as_bytes())? {
        Some(v) => Ok(Some(tx(decode_at("commands", id.as_bytes(), &v))?)),
        None => Ok(None),
    }
}

fn decode_command(k: &[u8], v: &[u8]) -> Result<Command, StoreError> {
    decode_at("commands", k, v)
}

/// The command ids after a 16-byte prefix in an index tree, oldest first.
fn ids_under(tree: &sled::Tree, prefix: &[u8; 16]) -> Result<Vec<CommandId>, StoreError> {
    tree.scan_prefix(prefix)
        .map(|e| {
            let (k, _) = e.map_err(backend)?;
            let mut id = [0u8; 16];
            id.copy_from_slice(k.get(16..32).unwrap_or(&[0; 16]));
            Ok(CommandId::from_bytes(id))
        })
        .collect()
}

#[async_trait]
impl CommandStore for SledStore {
    async fn enqueue_commands(&self, commands: &[Command]) -> StoreResult<Vec<Enqueued>> {
        let commands = commands.to_vec();
        self.blocking(move |t| {
            let r = (
                &t.commands,
                &t.commands_by_instance,
                &t.commands_open,
                &t.command_keys,
                &t.commands_by_batch,
                &t.meta,
                &t.feed,
            )
                .transaction(
                    |(cmds, by_instance, open, keys, by_batch, meta, feed)| {
                        let mut out = Vec::with_capacity(commands.len());
                        for c in &commands {
                            if let Some(key) = &c.idempotency_key
                                && let Some(existing) = keys.get(key_of(c.instance, key))?
                            {
                                let mut id = [0u8; 16];
                                id.copy_from_slice(existing.get(..16).unwrap_or(&[0; 16]));
                                if let Some(found) = get_tx(cmds, CommandId::from_bytes(id))? {
                                    out.push(Enqueued::Existing(found));
                                    continue;
                                }
                            }
                            if cmds.get(c.id.as_bytes())?.is_some() {
                                return abort(StoreError::AlreadyExists {
                                    kind: RecordKind::Command,
                                    id: c.id.to_string(),
                                });
                            }
                            cmds.insert(c.id.as_bytes(), tx(encode(c))?)?;
                            let ik = pair(c.instance.as_bytes(), c.id.as_bytes());
                            by_instance.insert(&ik, &[] as &[u8])?;
                            if !c.state.is_finished() {
                                open.insert(&ik, &[] as &[u8])?;
                            }
                            if let Some(key) = &c.idempotency_key {
                                keys.insert(key_of(c.instance, key), c.id.as_bytes())?;
                            }
                            if let Some(b) = c.batch {
                                by_batch
                                    .insert(&pair(b.as_bytes(), c.id.as_bytes()), &[] as &[u8])?;
                            }
                            append_change(meta, feed, c.instance, ChangeKind::CommandQueued)?;
                            out.push(Enqueued::Created(c.clone()));
                        }
                        Ok(out)
                    },
                );
            let out = finish(r)?;
            t.db.flush().map_err(backend)?;
            Ok(out)
        })
        .await
    }

    async fn get_command(&self, id: CommandId) -> StoreResult<Option<Command>> {
        self.blocking(
            move |t| match t.commands.get(id.as_bytes()).map_err(backend)? {
                Some(v) => decode_command(id.as_bytes(), &v).map(Some),
                None => Ok(None),
            },
        )
        .await
    }

    async fn list_commands(&self, query: &CommandQuery) -> StoreResult<Vec<Command>> {
        let query = query.clone();
        self.blocking(move |t| {
            let mut out = Vec::new();
            if query.limit == 0 {
                return Ok(out);
            }
            let mut take = |c: Command| {
                if query.matches(&c) {
                    out.push(c);
                }
                out.len() < query.limit
            };
            let index = match (query.instance, query.batch) {
                (Some(i), _) => Some((&t.commands_by_instance, *i.as_bytes())),
                (None, Some(b)) => Some((&t.commands_by_batch, *b.as_bytes())),
                (None, None) => None,
            };
            match index {
                Some((tree, prefix)) => {
                    let end = pair(
                        &prefix,
                        query.before.as_ref().map_or(&[0xff; 16], |b| b.as_bytes()),
                    );
                    for e in tree.range(pair(&prefix, &[0; 16])..end).rev() {
                        let (k, _) = e.map_err(backend)?;
                        let id = k.get(16..32).unwrap_or(&[]);
                        let Some(v) = t.commands.get(id).map_err(backend)? else {
                            continue;
                        };
                        if !take(decode_command(id, &v)?) {
                            break;
                        }
                    }
                }
                None => {
                    let end = query.before.map_or([0xff; 16], |b| *b.as_bytes());
                    for e in t.commands.range(..end).rev() {
                        let (k, v) = e.map_err(backend)?;
                        if !take(decode_command(&k, &v)?) {
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn deliver_commands(
        &self,
        instance: InstanceId,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Delivery> {
        self.blocking(move |t| {
            let ids = ids_under(&t.commands_open, instance.as_bytes())?;
            if ids.is_empty() {
                return Ok(Delivery::default());
            }
            let r = (&t.commands, &t.commands_open).transaction(|(cmds, open)| {
                let mut delivery = Delivery::default();
                let mut changed = false;
                for &id in &ids {
                    let Some(mut c) = get_tx(cmds, id)? else {
                        continue;
                    };
                    let ik = pair(instance.as_bytes(), id.as_bytes());
                    if c.state.is_finished() {
                        continue;
                    }
                    if c.expired_at(now) {
                        c.expire(now);
                        cmds.insert(id.as_bytes(), tx(encode(&c))?)?;
                        open.remove(&ik)?;
                        changed = true;
                        continue;
                    }
                    delivery.open += 1;
                    if delivery.commands.len() < limit && c.deliverable(now) {
                        c.deliver(now, lease);
                        cmds.insert(id.as_bytes(), tx(encode(&c))?)?;
                        delivery.commands.push(c);
                        changed = true;
                    }
                }
                Ok((delivery, changed))
            });
            let (delivery, changed) = finish(r)?;
            if changed {
                t.db.flush().map_err(backend)?;
            }
            Ok(delivery)
        })
        .await
    }

    async fn complete_command(
        &self,
        instance: InstanceId,
        id: CommandId,
        outcome: CommandOutcome,
        result: &CommandResult,
        now: Timestamp,
    ) -> StoreResult<Command> {
        let result = result.clone();
        self.blocking(move |t| {
            let r = (&t.commands, &t.commands_open).transaction(|(cmds, open)| {
                let Some(mut c) = get_tx(cmds, id)?.filter(|c| c.instance == instance) else {
                    return abort(not_found(id));
                };
                let changed = c.complete(outcome, result.clone(), now);
                if changed {
                    cmds.insert(id.as_bytes(), tx(encode(&c))?)?;
                    open.remove(&pair(instance.as_bytes(), id.as_bytes()))?;
                }
                Ok((c, changed))
            });
            let (c, changed) = finish(r)?;
            if changed {
                t.db.flush().map_err(backend)?;
            }
            Ok(c)
        })
        .await
    }

    async fn cancel_command(&self, id: CommandId, now: Timestamp) -> StoreResult<Command> {
        self.blocking(move |t| {
            let r = (&t.commands, &t.commands_open).transaction(|(cmds, open)| {
                let Some(mut c) = get_tx(cmds, id)? else {
                    return abort(not_found(id));
                };
                tx(c.cancel(now))?;
                cmds.insert(id.as_bytes(), tx(encode(&c))?)?;
                open.remove(&pair(c.instance.as_bytes(), id.as_bytes()))?;
                Ok(c)
            });
            let c = finish(r)?;
            t.db.flush().map_err(backend)?;
            Ok(c)
        })
        .await
    }

    async fn expire_commands(&self, now: Timestamp) -> StoreResult<usize> {
        self.blocking(move |t| {
            let mut expired = 0;
            for e in t.commands_open.iter() {
                let (k, _) = e.map_err(backend)?;
                let Some(id) = k.get(16..32) else { continue };
                let Some(v) = t.commands.get(id).map_err(backend)? else {
                    continue;
                };
                if !decode_command(id, &v)?.expired_at(now) {
                    continue;
                }
                let r = (&t.commands, &t.commands_open).transaction(|(cmds, open)| {
                    let Some(v) = cmds.get(id)? else {
                        return Ok(false);
                    };
                    let mut c = tx(decode_command(id, &v))?;
                    if !c.expired_at(now) {
                        return Ok(false);
                    }
                    c.expire(now);
                    cmds.insert(id, tx(encode(&c))?)?;
                    open.remove(&*k)?;
                    Ok(true)
                });
                expired += usize::from(finish(r)?);
            }
            if expired > 0 {
                t.db.flush().map_err(backend)?;
            }
            Ok(expired)
        })
        .await
    }

    async fn instances_with_open_commands(&self) -> StoreResult<Vec<InstanceId>> {
        self.blocking(|t| {
            let mut out: Vec<InstanceId> = Vec::new();
            for e in t.commands_open.iter() {
                let (k, _) = e.map_err(backend)?;
                let mut b = [0u8; 16];
                b.copy_from_slice(k.get(..16).unwrap_or(&[0; 16]));
                let id = InstanceId::from_bytes(b);
                if out.last() != Some(&id) {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn prune_commands(&self, before: Timestamp) -> StoreResult<usize> {
        self.blocking(move |t| {
            let mut pruned = 0;
            for e in t.commands.iter() {
                let (k, v) = e.map_err(backend)?;
                let c = decode_command(&k, &v)?;
                if c.finished_at.is_none_or(|f| f >= before) {
                    continue;
                }
                let r = (
                    &t.commands,
                    &t.commands_by_instance,
                    &t.command_keys,
                    &t.commands_by_batch,
                )
                    .transaction(|(cmds, by_instance, keys, by_batch)| {
                        cmds.remove(c.id.as_bytes())?;
                        by_instance.remove(&pair(c.instance.as_bytes(), c.id.as_bytes()))?;
                        if let Some(key) = &c.idempotency_key {
                            let kk = key_of(c.instance, key);
                            if keys.get(&kk)?.as_deref() == Some(c.id.as_bytes().as_slice()) {
                                keys.remove(kk)?;
                            }
                        }
                        if let Some(b) = c.batch {
                            by_batch.remove(&pair(b.as_bytes(), c.id.as_bytes()))?;
                        }
                        Ok(())
                    });
                finish(r)?;
                pruned += 1;
            }
            if pruned > 0 {
                t.db.flush().map_err(backend)?;
            }
            Ok(pruned)
        })
        .await
    }
}

#[async_trait]
impl PolicyStore for SledStore {
    async fn insert_policy(&self, policy: &Policy) -> StoreResult<()> {
        let value = encode(policy)?;
        let name = policy.name.clone();
        self.blocking(move |t| {
            let swapped = t
                .policies
                .compare_and_swap(name.as_str(), None as Option<&[u8]>, Some(value))
                .map_err(backend)?;
            if swapped.is_err() {
                return Err(StoreError::AlreadyExists {
                    kind: RecordKind::Policy,
                    id: name.to_string(),
                });
            }
            t.db.flush().map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn list_policies(&self) -> StoreResult<Vec<Policy>> {
        self.blocking(|t| {
            t.policies
                .iter()
                .map(|e| {
                    let (k, v) = e.map_err(backend)?;
                    decode_at("policies", &k, &v)
                })
                .collect()
        })
        .await
    }

    async fn delete_policy(&self, name: &PolicyName) -> StoreResult<()> {
        let name = name.clone();
        self.blocking(move |t| {
            if t.policies.remove(name.as_str()).map_err(backend)?.is_none() {
                return Err(StoreError::NotFound {
                    kind: RecordKind::Policy,
                    id: name.to_string(),
                });
            }
            t.db.flush().map_err(backend)?;
            Ok(())
        })
        .await
    }
}
