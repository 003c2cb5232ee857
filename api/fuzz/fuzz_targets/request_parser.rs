//! Feeds arbitrary (method, path, body) triples to `api::parse_request`, then encodes whatever
//! it answers. Input layout: byte 0 picks the method (or, past the known ones, the method is
//! the text up to the first space), the path runs to the first newline, the rest is the body.
//! A parsed `vm.create` config must survive a JSON round trip unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (method, rest) = match METHODS.get(usize::from(selector)) {
        Some(m) => (m.to_string(), rest),
        None => {
            let cut = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            let next = rest.get(cut + 1..).unwrap_or_default();
            (String::from_utf8_lossy(&rest[..cut]).into_owned(), next)
        }
    };
    let cut = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let path = String::from_utf8_lossy(&rest[..cut]);
    let body = rest.get(cut + 1..).unwrap_or_default();

    let result = api::parse_request(&method, &path, body);
    if let Ok(api::ApiRequest::VmCreate(config)) = &result {
        let json = serde_json::to_vec(config).expect("a parsed config serialises");
        let again: vmm::config::VmConfig =
            serde_json::from_slice(&json).expect("a serialised config parses");
        assert_eq!(**config, again, "JSON round trip changed the config");
        assert!(again.validate().is_ok());
    }
    let answer = result.map(|_| api::ApiResponse::Empty);
    let (code, body) = api::encode_response(&answer);
    assert!((200..600).contains(&code));
    if let Some(body) = body {
        serde_json::from_slice::<serde_json::Value>(&body).expect("answers are JSON");
    }
});
