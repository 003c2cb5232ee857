//! The boot menus an image names its kernels in: Boot Loader Specification entries, the
//! `grub.cfg` that grub-mkconfig generates, and `extlinux.conf`. Enough of each to find the
//! default entry's kernel, initrds and command line; not a GRUB interpreter: conditions are not
//! evaluated (both branches of an `if` are read, in order), commands other than `set`,
//! `search`, `linux` and `initrd` are skipped.

use std::collections::HashMap;

/// One bootable entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// As the menu shows it (a GRUB submenu's entries: `SUBMENU>TITLE`).
    pub title: String,
    /// Paths on the file system the menu names (see `fs_uuid`), absolute.
    pub kernel: String,
    pub initrds: Vec<String>,
    pub cmdline: String,
    /// The file system the paths are on, when the menu names one (GRUB's
    /// `search --fs-uuid --set=root UUID`); otherwise the menu's own.
    pub fs_uuid: Option<String>,
}

/// The entries of a menu and which one boots by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Menu {
    pub entries: Vec<Entry>,
    pub default: usize,
}

/// Splits a GRUB or shell-like line into words: single quotes keep everything, double quotes
/// and backslashes as in GRUB; `$NAME` and `${NAME}` outside single quotes are replaced from
/// `vars` (unknown ones are empty).
fn words(line: &str, vars: &HashMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), c) => word.push(c),
            (None, '\'') | (None, '"') => {
                quote = Some(c);
                in_word = true;
            }
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
                in_word = true;
            }
            (_, '$') => {
                let braced = chars.peek() == Some(&'{');
                if braced {
                    chars.next();
                }
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if braced && n == '}' {
                        chars.next();
                        break;
                    }
                    if !braced && !n.is_ascii_alphanumeric() && n != '_' {
                        break;
                    }
                    name.push(n);
                    chars.next();
                }
                if name.is_empty() && !braced {
                    word.push('$');
                    in_word = true;
                } else if let Some(v) = vars.get(&name).filter(|v| !v.is_empty()) {
                    if quote.is_some() {
                        word.push_str(v);
                        in_word = true;
                    } else {
                        // Unquoted, the value is split into words, as in a shell.
                        for c in v.chars() {
                            if c.is_whitespace() {
                                if in_word {
                                    out.push(std::mem::take(&mut word));
                                    in_word = false;
                                }
                            } else {
                                word.push(c);
                                in_word = true;
                            }
                        }
                    }
                } else if quote.is_some() {
                    // An empty expansion is a word only in quotes.
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '#') if !in_word => break,
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// `key=value` lines of a GRUB environment block (`grubenv`).
pub fn grubenv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A `grub.cfg`, with the variables of its environment block (`load_env`).
pub fn grub(text: &str, env: &HashMap<String, String>) -> Menu {
    let mut vars = env.clone();
    let mut entries: Vec<Entry> = Vec::new();
    // Top-level items (a menuentry, or a submenu: the range of its entries), for `default`.
    let mut top: Vec<(String, Option<String>, std::ops::Range<usize>)> = Vec::new();
    let mut submenu: Option<(String, Option<String>, usize)> = None;
    let mut current: Option<(Entry, Option<String>)> = None;
    let mut depth_in_entry = 0usize;
    for raw in text.lines() {
        let w = words(raw.trim(), &vars);
        let Some(first) = w.first().map(String::as_str) else {
            continue;
        };
        if let Some((entry, _)) = current.as_mut() {
            match first {
                "}" if depth_in_entry == 0 => {
                    let (entry, id) = current.take().expect("an entry");
                    if !entry.kernel.is_empty() {
                        let i = entries.len();
                        entries.push(entry.clone());
                        if submenu.is_none() {
                            top.push((entry.title, id, i..i + 1));
                        }
                    }
                }
                "}" => depth_in_entry -= 1,
                "set" => set(&w, &mut vars),
                "search" | "search.fs_uuid" => {
                    let fs_uuid = if first == "search.fs_uuid" {
                        w.get(1).cloned()
                    } else if w.iter().any(|a| a == "--fs-uuid" || a == "-u") {
                        w.iter().skip(1).rfind(|a| !a.starts_with('-')).cloned()
                    } else {
                        None
                    };
                    if fs_uuid.is_some() {
                        entry.fs_uuid = fs_uuid;
                    }
                }
                "linux" | "linuxefi" | "linux16" if w.len() > 1 => {
                    entry.kernel = w[1].clone();
                    entry.cmdline = w[2..].join(" ");
                }
                "initrd" | "initrdefi" | "initrd16" => entry.initrds = w[1..].to_vec(),
                _ if w.last().is_some_and(|l| l == "{") => depth_in_entry += 1,
                _ => {}
            }
            continue;
        }
        match first {
            "set" => set(&w, &mut vars),
            "menuentry" if w.len() > 1 => {
                let title = match &submenu {
                    Some((s, _, _)) => format!("{s}>{}", w[1]),
                    None => w[1].clone(),
                };
                current = Some((
                    Entry {
                        title,
                        kernel: String::new(),
                        initrds: Vec::new(),
                        cmdline: String::new(),
                        fs_uuid: None,
                    },
                    id_of(&w),
                ));
                depth_in_entry = 0;
            }
            "submenu" if w.len() > 1 => submenu = Some((w[1].clone(), id_of(&w), entries.len())),
            "}" => {
                if let Some((title, id, from)) = submenu.take() {
                    if from < entries.len() {
                        top.push((title, id, from..entries.len()));
                    }
                }
            }
            _ => {}
        }
    }
    let default = vars
        .get("default")
        .and_then(|d| pick(d, &top, &entries))
        .unwrap_or(0);
    Menu { entries, default }
}

/// GRUB's `set NAME=VALUE` (the words are already unquoted).
fn set(w: &[String], vars: &mut HashMap<String, String>) {
    if let Some((name, value)) = w.get(1).and_then(|a| a.split_once('=')) {
        vars.insert(name.to_owned(), value.to_owned());
    }
}

/// A menuentry's `--id ID` (grub-mkconfig writes `$menuentry_id_option 'ID'`, the variable
/// being `--id`).
fn id_of(w: &[String]) -> Option<String> {
    w.iter()
        .position(|a| a == "--id" || a == "$menuentry_id_option")
        .and_then(|i| w.get(i + 1).cloned())
}

/// GRUB's `default`: a number, `N>M` into a submenu, a title or an id (also `A>B` of those).
fn pick(
    default: &str,
    top: &[(String, Option<String>, std::ops::Range<usize>)],
    entries: &[Entry],
) -> Option<usize> {
    let (outer, inner) = match default.split_once('>') {
        Some((o, i)) => (o, Some(i)),
        None => (default, None),
    };
    let item = match outer.parse::<usize>() {
        Ok(n) => top.get(n)?,
        Err(_) => top
            .iter()
            .find(|(title, id, _)| title == outer || id.as_deref() == Some(outer))?,
    };
    let range = item.2.clone();
    match inner {
        None => Some(range.start),
        Some(i) => match i.parse::<usize>() {
            Ok(n) => Some(range.start + n).filter(|k| range.contains(k)),
            Err(_) => range.clone().find(|&k| {
                entries[k]
                    .title
                    .rsplit_once('>')
                    .is_some_and(|(_, t)| t == i)
            }),
        },
    }
}

/// Boot Loader Specification entries (`loader/entries/NAME.conf`, as (NAME, text)), newest
/// version first; `$VAR` in `options` from the GRUB environment block (`kernelopts`).
pub fn bls(files: &[(String, String)], env: &HashMap<String, String>) -> Menu {
    let mut entries: Vec<(String, Entry)> = Vec::new();
    for (name, text) in files {
        let mut e = Entry {
            title: String::new(),
            kernel: String::new(),
            initrds: Vec::new(),
            cmdline: String::new(),
            fs_uuid: None,
        };
        let mut version = String::new();
        let mut options = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            let (key, value) = line
                .split_once(char::is_whitespace)
                .map_or((line, ""), |(k, v)| (k, v.trim()));
            match key {
                "title" => e.title = value.to_owned(),
                "version" => version = value.to_owned(),
                "linux" => e.kernel = value.to_owned(),
                "initrd" => e
                    .initrds
                    .extend(value.split_whitespace().map(str::to_owned)),
                "options" => options.push(words(value, env).join(" ")),
                _ => {}
            }
        }
        if e.kernel.is_empty() {
            continue;
        }
        e.cmdline = options.join(" ");
        if e.title.is_empty() {
            e.title = name.clone();
        }
        let key = if version.is_empty() {
            name.clone()
        } else {
            version
        };
        entries.push((key, e));
    }
    entries.sort_by(|a, b| version_cmp(&b.0, &a.0));
    Menu {
        entries: entries.into_iter().map(|(_, e)| e).collect(),
        default: 0,
    }
}

/// Compares version strings as people read them: runs of digits by value, the rest as text.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while let Some(&c) = chars.peek() {
            let digit = c.is_ascii_digit();
            let mut run = String::new();
            while let Some(&n) = chars.peek() {
                if n.is_ascii_digit() != digit {
                    break;
                }
                run.push(n);
                chars.next();
            }
            out.push(if digit {
                run.parse::<u64>().map_err(|_| run)
            } else {
                Err(run)
            });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// An `extlinux.conf` / `syslinux.cfg` found in directory `dir` (relative paths are from it).
pub fn extlinux(text: &str, dir: &str) -> Menu {
    let mut entries: Vec<(String, Entry)> = Vec::new();
    let mut default_label = None;
    let absolute = |p: &str| {
        if p.starts_with('/') {
            p.to_owned()
        } else {
            format!("{}/{p}", dir.trim_end_matches('/'))
        }
    };
    for line in text.lines() {
        let line = line.trim();
        let (key, value) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        let key = key.to_ascii_lowercase();
        match key.as_str() {
            "default" => default_label = Some(value.to_owned()),
            "label" => entries.push((
                value.to_owned(),
                Entry {
                    title: value.to_owned(),
                    kernel: String::new(),
                    initrds: Vec::new(),
                    cmdline: String::new(),
                    fs_uuid: None,
                },
            )),
            _ => {
                let Some((_, e)) = entries.last_mut() else {
                    continue;
                };
                match key.as_str() {
                    "kernel" | "linux" => e.kernel = absolute(value),
                    "initrd" => e.initrds = value.split(',').map(|p| absolute(p.trim())).collect(),
                    "append" => {
                        let mut rest = Vec::new();
                        for word in value.split_whitespace() {
                            match word.strip_prefix("initrd=") {
                                Some(p) if e.initrds.is_empty() => {
                                    e.initrds = p.split(',').map(absolute).collect()
                                }
                                _ => rest.push(word),
                            }
                        }
                        e.cmdline = rest.join(" ");
                    }
                    "menu" => {
                        if let Some(title) = value
                            .strip_prefix("label ")
                            .or(value.strip_prefix("LABEL "))
                        {
                            e.title = title.trim().to_owned();
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let entries: Vec<(String, Entry)> = entries
        .into_iter()
        .filter(|(_, e)| !e.kernel.is_empty())
        .collect();
    let default = default_label
        .and_then(|d| entries.iter().position(|(label, _)| *label == d))
        .unwrap_or(0);
    Menu {
        entries: entries.into_iter().map(|(_, e)| e).collect(),
        default,
    }
}

#[cfg(test)]
mod tests;
