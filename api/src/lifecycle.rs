//! The API's requests against the VMM's lifecycle table ([`vmm::lifecycle`]): the fake VMM
//! checks its requests here, so it refuses exactly what the real VMM refuses, in the same words.

use vmm::lifecycle::{self, Action, Refusal, VmState};

use crate::types::{ApiError, ApiRequest, ErrorStatus};

/// The lifecycle action of a request (`None` for `vmm.*`, which any state allows).
pub fn action(request: &ApiRequest) -> Option<Action> {
    Some(match request {
        ApiRequest::VmmPing | ApiRequest::VmmShutdown | ApiRequest::VmmMetrics => return None,
        ApiRequest::VmCreate(_) => Action::Create,
        ApiRequest::VmBoot => Action::Boot,
        ApiRequest::VmDelete => Action::Delete,
        ApiRequest::VmInfo => Action::Info,
        ApiRequest::VmCounters => Action::Counters,
        ApiRequest::VmPause => Action::Pause,
        ApiRequest::VmResume => Action::Resume,
        ApiRequest::VmShutdown => Action::Shutdown,
        ApiRequest::VmReboot => Action::Reboot,
        ApiRequest::VmPowerButton => Action::PowerButton,
        ApiRequest::VmSnapshot { .. } => Action::Snapshot,
        ApiRequest::VmRestore { .. } => Action::Restore,
        ApiRequest::VmSendMigration { .. } => Action::SendMigration,
        ApiRequest::VmReceiveMigration { .. } => Action::ReceiveMigration,
        ApiRequest::VmCancelMigration => Action::CancelMigration,
    })
}

/// The VM's state after `request` succeeds, given the state now (`None`: no VM created);
/// `Ok(None)`: no VM afterwards. Errors: 404 for a VM action with no VM, 409 for the wrong
/// state, as [`vmm::lifecycle::next_state`] decides.
pub fn next_state(
    request: &ApiRequest,
    current: Option<VmState>,
) -> Result<Option<VmState>, ApiError> {
    match action(request) {
        None => Ok(current),
        Some(action) => lifecycle::next_state(action, current).map_err(ApiError::from),
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = match refusal {
            Refusal::NoVm { .. } => ErrorStatus::NotFound,
            Refusal::Exists { .. } | Refusal::WrongState { .. } => ErrorStatus::Conflict,
        };
        ApiError::new(status, refusal.to_string())
    }
}

/// The endpoint name of a request, e.g. `vm.pause`.
pub fn name(request: &ApiRequest) -> &'static str {
    match (request, action(request)) {
        (_, Some(action)) => action.name(),
        (ApiRequest::VmmShutdown, None) => "vmm.shutdown",
        (ApiRequest::VmmMetrics, None) => "vmm.metrics",
        (_, None) => "vmm.ping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::ROUTES;

    #[test]
    fn every_vm_route_is_a_lifecycle_action_of_the_same_name() {
        for route in ROUTES {
            let body: &[u8] = match route.endpoint {
                "vm.snapshot" => br#"{"destination_url":"file:///s"}"#,
                "vm.restore" => br#"{"source_url":"file:///s"}"#,
                "vm.send-migration" => br#"{"destination_url":"unix:/m.sock"}"#,
                "vm.receive-migration" => br#"{"receiver_url":"tcp:0.0.0.0:6000"}"#,
                _ => br#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":268435456}}"#,
            };
            let request = crate::parse_request(
                route.method,
                &format!("{}{}", crate::API_PREFIX, route.endpoint),
                body,
            );
            let request = request.unwrap_or_else(|e| panic!("{}: {e}", route.endpoint));
            assert_eq!(name(&request), route.endpoint);
            assert_eq!(
                action(&request).is_some(),
                route.endpoint.starts_with("vm.")
            );
        }
    }

    #[test]
    fn refusals_carry_their_status() {
        use VmState::*;
        let e = next_state(&ApiRequest::VmPause, Some(Created)).unwrap_err();
        assert_eq!(e.status, ErrorStatus::Conflict);
        assert_eq!(e.message, "vm.pause: the VM is Created; it must be Running");
        let e = next_state(&ApiRequest::VmInfo, None).unwrap_err();
        assert_eq!(e.status, ErrorStatus::NotFound);
        assert_eq!(next_state(&ApiRequest::VmmPing, None), Ok(None));
        assert_eq!(
            next_state(&ApiRequest::VmmShutdown, Some(Paused)),
            Ok(Some(Paused))
        );
        assert_eq!(next_state(&ApiRequest::VmDelete, None), Ok(None));
    }
}
