//! Saving and restoring device state, for snapshots and live migration.
//!
//! Every device implements [`Persist`]: `save` captures its guest-visible state as a plain
//! serialisable struct, `restore` puts a saved state back into a device built from the same
//! configuration, or says why it cannot (a different disk, another number of queues, a state
//! written by another version of the struct). What crosses `dyn` (a virtio device behind its
//! transport) is saved as a [`SavedState`]: the state with its version, as a serialisable
//! value, so the transport and the VMM never need to know the device's type (crosvm's
//! `virtio_snapshot`/`virtio_restore` are the model).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a state cannot be saved or put back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The state was written by another version of the device's state struct.
    #[error("{device}: saved state has version {found}, this podvisor reads version {expected}")]
    Version {
        device: &'static str,
        found: u16,
        expected: u16,
    },
    /// The saved state does not parse as the device's state.
    #[error("{device}: saved state is not readable: {reason}")]
    Format {
        device: &'static str,
        reason: String,
    },
    /// The saved state does not fit the device it is restored into.
    #[error("{device}: {reason}")]
    Mismatch {
        device: &'static str,
        reason: String,
    },
    /// A device is saved only while its worker is stopped (paused or never started).
    #[error("{device}: still running; pause it before saving")]
    Running { device: &'static str },
}

impl PersistError {
    /// A [`PersistError::Mismatch`].
    pub fn mismatch(device: &'static str, reason: impl Into<String>) -> Self {
        PersistError::Mismatch {
            device,
            reason: reason.into(),
        }
    }
}

/// Saved state of a device: what a snapshot or a live migration carries for it.
pub trait Persist {
    /// The device's name in errors, e.g. `virtio-blk`.
    const NAME: &'static str;
    /// The version of [`Persist::State`]'s shape, saved with it: bump it when the shape
    /// changes; a state of another version is refused ([`PersistError::Version`]).
    const STATE_VERSION: u16 = 1;

    /// The serialisable state.
    type State: Serialize + DeserializeOwned;

    /// Captures the device's guest-visible state.
    fn save(&self) -> Self::State;

    /// Puts the device back into a saved state, or says why the state does not fit it. The
    /// device is in an unspecified state after an error: build a fresh one to try again.
    fn restore(&mut self, state: &Self::State) -> Result<(), PersistError>;
}

/// A device's state with the version of its shape, as a serialisable value that crosses
/// `dyn` (see [`save_state`] and [`restore_state`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u16,
    pub state: serde_json::Value,
}

/// Saves `device` as a [`SavedState`].
pub fn save_state<P: Persist>(device: &P) -> Result<SavedState, PersistError> {
    let state = serde_json::to_value(device.save()).map_err(|e| PersistError::Format {
        device: P::NAME,
        reason: e.to_string(),
    })?;
    Ok(SavedState {
        version: P::STATE_VERSION,
        state,
    })
}

/// Restores `device` from a [`SavedState`], checking its version first.
pub fn restore_state<P: Persist>(device: &mut P, saved: &SavedState) -> Result<(), PersistError> {
    if saved.version != P::STATE_VERSION {
        return Err(PersistError::Version {
            device: P::NAME,
            found: saved.version,
            expected: P::STATE_VERSION,
        });
    }
    let state = P::State::deserialize(&saved.state).map_err(|e| PersistError::Format {
        device: P::NAME,
        reason: e.to_string(),
    })?;
    device.restore(&state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter {
        n: u32,
    }

    impl Persist for Counter {
        const NAME: &'static str = "counter";
        const STATE_VERSION: u16 = 3;
        type State = u32;

        fn save(&self) -> u32 {
            self.n
        }

        fn restore(&mut self, state: &u32) -> Result<(), PersistError> {
            if *state > 100 {
                return Err(PersistError::mismatch(Self::NAME, "over 100"));
            }
            self.n = *state;
            Ok(())
        }
    }

    #[test]
    fn saved_state_carries_the_version_and_refuses_another() {
        let saved = save_state(&Counter { n: 7 }).unwrap();
        assert_eq!(saved.version, 3);
        let mut c = Counter::default();
        restore_state(&mut c, &saved).unwrap();
        assert_eq!(c.n, 7);

        let old = SavedState {
            version: 2,
            ..saved.clone()
        };
        assert_eq!(
            restore_state(&mut c, &old).unwrap_err().to_string(),
            "counter: saved state has version 2, this podvisor reads version 3"
        );
        let garbled = SavedState {
            state: serde_json::json!("seven"),
            ..saved
        };
        assert!(matches!(
            restore_state(&mut c, &garbled),
            Err(PersistError::Format { .. })
        ));
        let big = SavedState {
            version: 3,
            state: serde_json::json!(101),
        };
        assert_eq!(
            restore_state(&mut c, &big).unwrap_err().to_string(),
            "counter: over 100"
        );
    }
}
