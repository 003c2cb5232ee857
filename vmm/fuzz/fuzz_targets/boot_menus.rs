//! The boot-menu parsers (grub.cfg, BLS entries with grubenv, extlinux.conf) on any text an
//! image may hold: a menu, possibly empty, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::boot::disk::menu;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The first line is also read as a grubenv block, the rest as the menus.
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let env = menu::grubenv(first);
    for m in [
        menu::grub(rest, &env),
        menu::bls(&[("a".into(), rest.into()), ("b".into(), first.into())], &env),
        menu::extlinux(rest, "/boot/extlinux"),
    ] {
        assert!(m.entries.is_empty() || m.default < m.entries.len());
    }
});
