//! The state rules of Cloud Hypervisor's API, stricter: an action in the wrong state is a 409
//! with the reason. One pure function, so the real VMM and the fake apply the same rules.

use vmm::config::VmState;

use crate::types::{ApiError, ApiRequest};

/// The VM's state after `request` succeeds, given the state now (`None`: no VM created).
/// `Ok(None)` means no VM afterwards (`vm.delete`); requests that change nothing return the
/// current state. Errors: 404 for a VM action with no VM, 409 for the wrong state.
pub fn next_state(
    request: &ApiRequest,
    current: Option<VmState>,
) -> Result<Option<VmState>, ApiError> {
    use VmState::*;
    let action = name(request);
    let need = |state: Option<VmState>| {
        state.ok_or_else(|| ApiError::not_found(format!("{action}: no VM has been created")))
    };
    let state = match request {
        ApiRequest::VmmPing | ApiRequest::VmmShutdown => return Ok(current),
        // Deleting nothing is not an error, as in Cloud Hypervisor.
        ApiRequest::VmDelete => return Ok(None),
        ApiRequest::VmCreate(_) => {
            return match current {
                None => Ok(Some(Created)),
                Some(state) => Err(ApiError::new(
                    crate::types::ErrorStatus::Conflict,
                    format!("{action}: a VM already exists (it is {state}); delete it first"),
                )),
            }
        }
        _ => need(current)?,
    };
    let wrong = |needs: &str| Err(ApiError::wrong_state(action, state, needs));
    match (request, state) {
        (ApiRequest::VmInfo | ApiRequest::VmCounters, _) => Ok(Some(state)),
        (ApiRequest::VmBoot, Created | Shutdown) => Ok(Some(Running)),
        (ApiRequest::VmBoot, _) => wrong("Created or Shutdown"),
        (ApiRequest::VmPause, Running) => Ok(Some(Paused)),
        (ApiRequest::VmPause, _) => wrong("Running"),
        (ApiRequest::VmResume, Paused) => Ok(Some(Running)),
        (ApiRequest::VmResume, _) => wrong("Paused"),
        (ApiRequest::VmShutdown, Running | Paused) => Ok(Some(Shutdown)),
        (ApiRequest::VmShutdown, _) => wrong("Running or Paused"),
        (ApiRequest::VmReboot, Running) => Ok(Some(Running)),
        (ApiRequest::VmReboot, _) => wrong("Running"),
        (ApiRequest::VmPowerButton, Running) => Ok(Some(Running)),
        (ApiRequest::VmPowerButton, _) => wrong("Running"),
        (
            ApiRequest::VmmPing
            | ApiRequest::VmmShutdown
            | ApiRequest::VmDelete
            | ApiRequest::VmCreate(_),
            _,
        ) => Ok(current),
    }
}

/// The endpoint name of a request, e.g. `vm.pause`.
pub fn name(request: &ApiRequest) -> &'static str {
    match request {
        ApiRequest::VmmPing => "vmm.ping",
        ApiRequest::VmmShutdown => "vmm.shutdown",
        ApiRequest::VmCreate(_) => "vm.create",
        ApiRequest::VmBoot => "vm.boot",
        ApiRequest::VmDelete => "vm.delete",
        ApiRequest::VmInfo => "vm.info",
        ApiRequest::VmCounters => "vm.counters",
        ApiRequest::VmPause => "vm.pause",
        ApiRequest::VmResume => "vm.resume",
        ApiRequest::VmShutdown => "vm.shutdown",
        ApiRequest::VmReboot => "vm.reboot",
        ApiRequest::VmPowerButton => "vm.power-button",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ErrorStatus;
    use VmState::*;

    type Outcome = Result<Option<VmState>, u16>;

    fn code(r: Result<Option<VmState>, ApiError>) -> Outcome {
        r.map_err(|e| e.status.code())
    }

    #[test]
    fn rules() {
        use ApiRequest as R;
        let all = [
            None,
            Some(Created),
            Some(Running),
            Some(Paused),
            Some(Shutdown),
        ];
        // (request, [outcome for each of `all`])
        let table: [(R, [Outcome; 5]); 8] = [
            (
                R::VmBoot,
                [
                    Err(404),
                    Ok(Some(Running)),
                    Err(409),
                    Err(409),
                    Ok(Some(Running)),
                ],
            ),
            (
                R::VmPause,
                [Err(404), Err(409), Ok(Some(Paused)), Err(409), Err(409)],
            ),
            (
                R::VmResume,
                [Err(404), Err(409), Err(409), Ok(Some(Running)), Err(409)],
            ),
            (
                R::VmShutdown,
                [
                    Err(404),
                    Err(409),
                    Ok(Some(Shutdown)),
                    Ok(Some(Shutdown)),
                    Err(409),
                ],
            ),
            (
                R::VmReboot,
                [Err(404), Err(409), Ok(Some(Running)), Err(409), Err(409)],
            ),
            (
                R::VmPowerButton,
                [Err(404), Err(409), Ok(Some(Running)), Err(409), Err(409)],
            ),
            (
                R::VmInfo,
                [
                    Err(404),
                    Ok(Some(Created)),
                    Ok(Some(Running)),
                    Ok(Some(Paused)),
                    Ok(Some(Shutdown)),
                ],
            ),
            (
                R::VmDelete,
                [Ok(None), Ok(None), Ok(None), Ok(None), Ok(None)],
            ),
        ];
        for (request, outcomes) in table {
            for (state, outcome) in all.iter().zip(outcomes) {
                assert_eq!(
                    code(next_state(&request, *state)),
                    outcome,
                    "{request:?} in {state:?}"
                );
            }
        }
        assert_eq!(code(next_state(&R::VmmPing, None)), Ok(None));
        let e = next_state(&R::VmPause, Some(Created)).unwrap_err();
        assert_eq!(e.status, ErrorStatus::Conflict);
        assert_eq!(e.message, "vm.pause: the VM is Created; it must be Running");
    }
}
