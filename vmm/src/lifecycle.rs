//! The VM's lifecycle rules: its states and which action is allowed in which state, as one
//! table ([`RULES`]). The real controller ([`crate::controller`]) and the API's fake VMM both
//! ask [`next_state`] before they act, so they refuse the same requests with the same words,
//! and `api/src/types.rs` and `api/openapi.yaml` document this table (tests compare them).
//!
//! | action           | allowed in                   | state after       |
//! |------------------|------------------------------|-------------------|
//! | vm.create        | no VM                        | Created           |
//! | vm.boot          | Created, Shutdown            | Running           |
//! | vm.pause         | Running                      | Paused            |
//! | vm.resume        | Paused                       | Running           |
//! | vm.shutdown      | Running, Paused              | Shutdown          |
//! | vm.reboot        | Running                      | Running           |
//! | vm.power-button  | Running                      | unchanged         |
//! | vm.info          | any VM                       | unchanged         |
//! | vm.counters      | any VM                       | unchanged         |
//! | vm.snapshot      | Paused                       | unchanged         |
//! | vm.restore       | no VM                        | Paused            |
//! | vm.send-migration    | Running                  | no VM             |
//! | vm.receive-migration | no VM                    | Running           |
//! | vm.cancel-migration  | Running                  | unchanged         |
//! | vm.delete        | always (no VM: nothing to do)| no VM             |
//!
//! A VM action with no VM is refused as [`Refusal::NoVm`] (HTTP 404), one in the wrong state as
//! [`Refusal::WrongState`] or [`Refusal::Exists`] (409). The guest moves the state too, outside
//! this table: a power-off makes a Running VM Shutdown, a reset reboots it (still Running).

use serde::{Deserialize, Serialize};

/// Where a VM is in its life, as the API's `vm.info` reports it (Cloud Hypervisor's `VmState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Configured (`vm.create`), not booted yet.
    Created,
    Running,
    Paused,
    /// The guest was shut down (or powered off); `vm.boot` starts it again.
    Shutdown,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A lifecycle action on the VM (the API's `vm.*` endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    Boot,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    PowerButton,
    Info,
    Counters,
    Snapshot,
    Restore,
    SendMigration,
    ReceiveMigration,
    CancelMigration,
    Delete,
}

impl Action {
    /// The API's name for it, e.g. `vm.pause`.
    pub fn name(self) -> &'static str {
        self.rule().name
    }

    /// This action's row of [`RULES`].
    pub fn rule(self) -> &'static Rule {
        RULES
            .iter()
            .find(|r| r.action == self)
            .expect("RULES has a row for every action")
    }
}

/// When an action is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Only when there is no VM yet.
    WithoutVm,
    /// With a VM in one of these states.
    In(&'static [VmState]),
    /// With a VM in any state.
    AnyVm,
    /// With or without a VM.
    Always,
}

/// The VM's state after an allowed action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Is(VmState),
    Unchanged,
    /// The VM is gone.
    NoVm,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    /// The API endpoint, e.g. `vm.pause`.
    pub name: &'static str,
    pub allowed: Allowed,
    pub after: After,
}

impl Rule {
    /// The row as a sentence, e.g. "Allowed when the VM is Running; afterwards it is Paused."
    /// (`api/openapi.yaml` gives each operation this sentence as its description.)
    pub fn describe(&self) -> String {
        let when = match self.allowed {
            Allowed::WithoutVm => "when no VM exists".to_owned(),
            Allowed::In(states) => format!("when the VM is {}", needs(states)),
            Allowed::AnyVm => "when a VM exists".to_owned(),
            Allowed::Always => "always".to_owned(),
        };
        let after = match self.after {
            After::Is(state) => format!("afterwards it is {state}"),
            After::Unchanged => "the state does not change".to_owned(),
            After::NoVm => "afterwards there is no VM".to_owned(),
        };
        format!("Allowed {when}; {after}.")
    }
}

const fn rule(action: Action, name: &'static str, allowed: Allowed, after: After) -> Rule {
    Rule {
        action,
        name,
        allowed,
        after,
    }
}

use VmState::{Created, Paused, Running, Shutdown};

/// The lifecycle rules, one row per action (the table in this module's docs).
#[rustfmt::skip]
pub const RULES: &[Rule] = &[
    rule(Action::Create,      "vm.create",       Allowed::WithoutVm,                  After::Is(Created)),
    rule(Action::Boot,        "vm.boot",         Allowed::In(&[Created, Shutdown]),   After::Is(Running)),
    rule(Action::Pause,       "vm.pause",        Allowed::In(&[Running]),             After::Is(Paused)),
    rule(Action::Resume,      "vm.resume",       Allowed::In(&[Paused]),              After::Is(Running)),
    rule(Action::Shutdown,    "vm.shutdown",     Allowed::In(&[Running, Paused]),     After::Is(Shutdown)),
    rule(Action::Reboot,      "vm.reboot",       Allowed::In(&[Running]),             After::Is(Running)),
    rule(Action::PowerButton, "vm.power-button", Allowed::In(&[Running]),             After::Unchanged),
    rule(Action::Info,        "vm.info",         Allowed::AnyVm,                      After::Unchanged),
    rule(Action::Counters,    "vm.counters",     Allowed::AnyVm,                      After::Unchanged),
    rule(Action::Snapshot,    "vm.snapshot",     Allowed::In(&[Paused]),              After::Unchanged),
    rule(Action::Restore,     "vm.restore",      Allowed::WithoutVm,                  After::Is(Paused)),
    rule(Action::SendMigration, "vm.send-migration", Allowed::In(&[Running]),        After::NoVm),
    rule(Action::ReceiveMigration, "vm.receive-migration", Allowed::WithoutVm,       After::Is(Running)),
    rule(Action::CancelMigration, "vm.cancel-migration", Allowed::In(&[Running]),    After::Unchanged),
    rule(Action::Delete,      "vm.delete",       Allowed::Always,                     After::NoVm),
];

/// Why an action is refused; the message names the action, the state and what it needs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A VM action with no VM created (HTTP 404).
    #[error("{action}: no VM has been created")]
    NoVm { action: &'static str },
    /// `vm.create` while a VM exists (HTTP 409).
    #[error("{action}: a VM already exists (it is {state}); delete it first")]
    Exists {
        action: &'static str,
        state: VmState,
    },
    /// The VM is in a state the action does not apply to (HTTP 409).
    #[error("{action}: the VM is {state}; it must be {}", needs(allowed))]
    WrongState {
        action: &'static str,
        state: VmState,
        allowed: &'static [VmState],
    },
}

fn needs(states: &[VmState]) -> String {
    let names: Vec<String> = states.iter().map(VmState::to_string).collect();
    names.join(" or ")
}

/// The VM's state after `action`, given the state now (`None`: no VM), or why it is refused.
/// `Ok(None)`: no VM afterwards.
pub fn next_state(action: Action, current: Option<VmState>) -> Result<Option<VmState>, Refusal> {
    let rule = action.rule();
    let action = rule.name;
    match (rule.allowed, current) {
        (Allowed::Always, _) | (Allowed::WithoutVm, None) => {}
        (Allowed::WithoutVm, Some(state)) => return Err(Refusal::Exists { action, state }),
        (Allowed::In(_) | Allowed::AnyVm, None) => return Err(Refusal::NoVm { action }),
        (Allowed::AnyVm, Some(_)) => {}
        (Allowed::In(allowed), Some(state)) => {
            if !allowed.contains(&state) {
                return Err(Refusal::WrongState {
                    action,
                    state,
                    allowed,
                });
            }
        }
    }
    Ok(match rule.after {
        After::Is(state) => Some(state),
        After::Unchanged => current,
        After::NoVm => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Option<VmState>; 5] = [
        None,
        Some(Created),
        Some(Running),
        Some(Paused),
        Some(Shutdown),
    ];

    /// What each action does in each of [`ALL`]: `x` refused, `=` unchanged, `-` no VM after,
    /// otherwise the first letter of the state after (C, R, P, S).
    fn outcomes(action: Action) -> String {
        ALL.iter()
            .map(|&state| match next_state(action, state) {
                Err(_) => 'x',
                Ok(after) if after == state => '=',
                Ok(None) => '-',
                Ok(Some(s)) => s.to_string().chars().next().unwrap(),
            })
            .collect()
    }

    #[test]
    fn the_table() {
        //          none Created Running Paused Shutdown
        let expected = [
            (Action::Create, "Cxxxx"),
            (Action::Boot, "xRxxR"),
            (Action::Pause, "xxPxx"),
            (Action::Resume, "xxxRx"),
            (Action::Shutdown, "xxSSx"),
            (Action::Reboot, "xx=xx"),
            (Action::PowerButton, "xx=xx"),
            (Action::Info, "x===="),
            (Action::Counters, "x===="),
            (Action::Snapshot, "xxx=x"),
            (Action::Restore, "Pxxxx"),
            (Action::SendMigration, "xx-xx"),
            (Action::ReceiveMigration, "Rxxxx"),
            (Action::CancelMigration, "xx=xx"),
            (Action::Delete, "=----"),
        ];
        assert_eq!(expected.len(), RULES.len());
        for (action, row) in expected {
            assert_eq!(outcomes(action), row, "{action:?}");
        }
    }

    #[test]
    fn refusals_name_the_action_the_state_and_the_need() {
        let msg = |a, s| next_state(a, s).unwrap_err().to_string();
        assert_eq!(
            msg(Action::Pause, Some(Created)),
            "vm.pause: the VM is Created; it must be Running"
        );
        assert_eq!(
            msg(Action::Boot, Some(Paused)),
            "vm.boot: the VM is Paused; it must be Created or Shutdown"
        );
        assert_eq!(msg(Action::Info, None), "vm.info: no VM has been created");
        assert_eq!(
            msg(Action::Create, Some(Running)),
            "vm.create: a VM already exists (it is Running); delete it first"
        );
        assert!(matches!(
            next_state(Action::Resume, None),
            Err(Refusal::NoVm { .. })
        ));
    }

    #[test]
    fn rows_read_as_sentences() {
        assert_eq!(
            Action::Boot.rule().describe(),
            "Allowed when the VM is Created or Shutdown; afterwards it is Running."
        );
        assert_eq!(
            Action::Delete.rule().describe(),
            "Allowed always; afterwards there is no VM."
        );
    }

    #[test]
    fn every_action_has_one_row_and_a_distinct_name() {
        for (i, r) in RULES.iter().enumerate() {
            assert_eq!(r.action.rule(), r);
            assert!(r.name.starts_with("vm."));
            assert!(RULES[..i]
                .iter()
                .all(|o| o.action != r.action && o.name != r.name));
        }
    }
}
