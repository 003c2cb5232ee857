//! A small ISO 9660 image writer with Joliet names: a volume label and a tree of folders and
//! files, laid out in one pass. Enough for the disks cloud-init reads (`cidata`, `config-2`);
//! Linux, blkid and cloud-init take the Joliet names (lower case, dashes), other readers the
//! plain ISO 9660 ones (upper-case 8.3-ish, as level 1 asks).
//!
//! ```text
//! sector 0-15   system area (zeros)
//! sector 16     primary volume descriptor        (ISO 9660 names)
//! sector 17     supplementary volume descriptor  (Joliet: UCS-2 names, escape %/E)
//! sector 18     descriptor set terminator
//! then          path tables (L and M) for each, the folders (each twice), the files (once)
//! ```

use std::collections::BTreeMap;

const SECTOR: usize = 2048;

/// A folder of the image: named entries, files or folders.
#[derive(Debug, Default)]
pub struct Folder {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
enum Entry {
    File(Vec<u8>),
    Folder(Folder),
}

impl Folder {
    /// Adds a file at `path` (`a/b/c`), making the folders on the way.
    pub fn add_file(&mut self, path: &str, data: Vec<u8>) {
        let (dirs, name) = match path.rsplit_once('/') {
            Some((dirs, name)) => (Some(dirs), name),
            None => (None, path),
        };
        let mut folder = self;
        for part in dirs.into_iter().flat_map(|d| d.split('/')) {
            let entry = folder
                .entries
                .entry(part.to_owned())
                .or_insert_with(|| Entry::Folder(Folder::default()));
            folder = match entry {
                Entry::Folder(f) => f,
                Entry::File(_) => panic!("{part} is a file, not a folder"),
            };
        }
        folder.entries.insert(name.to_owned(), Entry::File(data));
    }
}

/// How one naming scheme (ISO 9660 or Joliet) writes names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Names {
    Iso,
    Joliet,
}

impl Names {
    fn encode(self, name: &str, is_file: bool) -> Vec<u8> {
        match self {
            Names::Iso => {
                let mut n: String = name
                    .chars()
                    .map(|c| match c.to_ascii_uppercase() {
                        c @ ('A'..='Z' | '0'..='9' | '_') => c,
                        '.' if is_file => '.',
                        _ => '_',
                    })
                    .collect();
                if is_file {
                    if !n.contains('.') {
                        n.push('.');
                    }
                    n.push_str(";1");
                }
                n.into_bytes()
            }
            Names::Joliet => {
                let mut n = name.to_owned();
                if is_file {
                    n.push_str(";1");
                }
                n.encode_utf16().flat_map(|u| u.to_be_bytes()).collect()
            }
        }
    }
}

/// A folder's place in the image, per naming scheme: its folders in path-table order.
struct Placed<'a> {
    folder: &'a Folder,
    /// Index of the parent in path-table order (1-based, as the tables count).
    parent: u16,
    name: String,
    sector: u32,
    sectors: u32,
}

/// The image of `root` with volume label `label` (at most 16 characters).
pub fn image(label: &str, root: &Folder) -> Vec<u8> {
    // Folders in breadth-first order: the order path tables list them in.
    let mut folders = vec![Placed {
        folder: root,
        parent: 1,
        name: String::new(),
        sector: 0,
        sectors: 0,
    }];
    let mut i = 0;
    while i < folders.len() {
        let folder = folders[i].folder;
        for (name, entry) in &folder.entries {
            if let Entry::Folder(f) = entry {
                folders.push(Placed {
                    folder: f,
                    parent: (i + 1) as u16,
                    name: name.clone(),
                    sector: 0,
                    sectors: 0,
                });
            }
        }
        i += 1;
    }
    // Files, in the same order, each once (both schemes point at the same data).
    let mut files: Vec<&Vec<u8>> = Vec::new();
    for p in &folders {
        for entry in p.folder.entries.values() {
            if let Entry::File(data) = entry {
                files.push(data);
            }
        }
    }

    let mut next = 19u32; // after the three descriptors
    let mut layout = Vec::new();
    for names in [Names::Iso, Names::Joliet] {
        let table = path_table_len(&folders, names);
        let table_sectors = table.div_ceil(SECTOR) as u32;
        let l_table = next;
        let m_table = next + table_sectors;
        next = m_table + table_sectors;
        let mut placed: Vec<(u32, u32)> = Vec::new();
        for p in &folders {
            let sectors = folder_len(p.folder, names).div_ceil(SECTOR) as u32;
            placed.push((next, sectors));
            next += sectors;
        }
        layout.push((names, table, l_table, m_table, placed));
    }
    let mut file_sectors = Vec::new();
    for data in &files {
        file_sectors.push(next);
        next += (data.len().div_ceil(SECTOR) as u32).max(1);
    }
    let total = next;

    let mut out = vec![0u8; total as usize * SECTOR];
    for (names, table, l_table, m_table, placed) in &layout {
        let folders: Vec<Placed> = folders
            .iter()
            .zip(placed)
            .map(|(p, &(sector, sectors))| Placed {
                folder: p.folder,
                parent: p.parent,
                name: p.name.clone(),
                sector,
                sectors,
            })
            .collect();
        // File data sectors, found in the same walk order.
        let mut file_at = file_sectors.iter().copied();
        let mut file_sector_of = Vec::new();
        for p in &folders {
            for entry in p.folder.entries.values() {
                if matches!(entry, Entry::File(_)) {
                    file_sector_of.push(file_at.next().expect("one sector per file"));
                }
            }
        }
        let mut files_seen = 0;
        for p in &folders {
            let parent = &folders[p.parent as usize - 1];
            let mut dir = Vec::new();
            record(&mut dir, &[0], p.sector, p.sectors * SECTOR as u32, true);
            record(
                &mut dir,
                &[1],
                parent.sector,
                parent.sectors * SECTOR as u32,
                true,
            );
            for (name, entry) in &p.folder.entries {
                let (sector, len, is_dir) = match entry {
                    Entry::File(data) => {
                        let s = file_sector_of[files_seen];
                        files_seen += 1;
                        (s, data.len() as u32, false)
                    }
                    Entry::Folder(f) => {
                        let child = folders
                            .iter()
                            .position(|c| std::ptr::eq(c.folder, f))
                            .expect("every folder is placed");
                        (
                            folders[child].sector,
                            folders[child].sectors * SECTOR as u32,
                            true,
                        )
                    }
                };
                // A record never crosses a sector boundary.
                let name = names.encode(name, !is_dir);
                let len_of = 33 + name.len() + (name.len() + 1) % 2;
                if dir.len() / SECTOR != (dir.len() + len_of - 1) / SECTOR {
                    dir.resize(dir.len().div_ceil(SECTOR) * SECTOR, 0);
                }
                record(&mut dir, &name, sector, len, is_dir);
            }
            let at = p.sector as usize * SECTOR;
            out[at..at + dir.len()].copy_from_slice(&dir);
        }
        let l = path_table(&folders, *names, false);
        let m = path_table(&folders, *names, true);
        debug_assert_eq!(l.len(), *table);
        out[*l_table as usize * SECTOR..][..l.len()].copy_from_slice(&l);
        out[*m_table as usize * SECTOR..][..m.len()].copy_from_slice(&m);
        let descriptor = volume_descriptor(
            *names,
            label,
            total,
            *table as u32,
            (*l_table, *m_table),
            (folders[0].sector, folders[0].sectors),
        );
        let at = if *names == Names::Iso { 16 } else { 17 } * SECTOR;
        out[at..at + SECTOR].copy_from_slice(&descriptor);
    }
    // The terminator.
    let t = 18 * SECTOR;
    out[t] = 255;
    out[t + 1..t + 6].copy_from_slice(b"CD001");
    out[t + 6] = 1;
    for (data, sector) in files.iter().zip(&file_sectors) {
        let at = *sector as usize * SECTOR;
        out[at..at + data.len()].copy_from_slice(data);
    }
    out
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// A directory record (ECMA-119 9.1), appended to `out`.
fn record(out: &mut Vec<u8>, name: &[u8], sector: u32, len: u32, is_dir: bool) {
    let total = 33 + name.len() + (name.len() + 1) % 2;
    let start = out.len();
    out.resize(start + total, 0);
    let r = &mut out[start..];
    r[0] = total as u8;
    r[2..10].copy_from_slice(&both32(sector));
    r[10..18].copy_from_slice(&both32(len));
    // Recording time: 1 January 2000, 00:00 UTC (reproducible images).
    r[18] = 100;
    r[19] = 1;
    r[20] = 1;
    r[25] = if is_dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r[33..33 + name.len()].copy_from_slice(name);
}

fn folder_len(folder: &Folder, names: Names) -> usize {
    let mut len = 34 * 2; // "." and ".."
    for (name, entry) in &folder.entries {
        let n = names.encode(name, matches!(entry, Entry::File(_))).len();
        let rec = 33 + n + (n + 1) % 2;
        if len / SECTOR != (len + rec - 1) / SECTOR {
            len = len.div_ceil(SECTOR) * SECTOR;
        }
        len += rec;
    }
    len
}

fn path_table_len(folders: &[Placed], names: Names) -> usize {
    folders
        .iter()
        .map(|p| {
            let n = if p.name.is_empty() {
                1
            } else {
                names.encode(&p.name, false).len()
            };
            8 + n + n % 2
        })
        .sum()
}

fn path_table(folders: &[Placed], names: Names, big_endian: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for p in folders {
        let name = if p.name.is_empty() {
            vec![0]
        } else {
            names.encode(&p.name, false)
        };
        out.push(name.len() as u8);
        out.push(0);
        if big_endian {
            out.extend_from_slice(&p.sector.to_be_bytes());
            out.extend_from_slice(&p.parent.to_be_bytes());
        } else {
            out.extend_from_slice(&p.sector.to_le_bytes());
            out.extend_from_slice(&p.parent.to_le_bytes());
        }
        out.extend_from_slice(&name);
        if name.len() % 2 == 1 {
            out.push(0);
        }
    }
    out
}

/// The primary (ISO 9660) or supplementary (Joliet) volume descriptor.
fn volume_descriptor(
    names: Names,
    label: &str,
    sectors: u32,
    table_len: u32,
    (l_table, m_table): (u32, u32),
    (root, root_sectors): (u32, u32),
) -> [u8; SECTOR] {
    let mut d = [0u8; SECTOR];
    d[0] = if names == Names::Iso { 1 } else { 2 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let text = |d: &mut [u8; SECTOR], at: usize, len: usize, value: &str| match names {
        Names::Iso => {
            let field = &mut d[at..at + len];
            field.fill(b' ');
            for (f, c) in field.iter_mut().zip(value.bytes()) {
                *f = c;
            }
        }
        Names::Joliet => {
            // UCS-2 spaces; an odd field's last byte stays zero.
            let field = &mut d[at..at + len];
            for pair in field.chunks_exact_mut(2) {
                pair.copy_from_slice(&[0, b' ']);
            }
            for (pair, u) in field.chunks_exact_mut(2).zip(value.encode_utf16()) {
                pair.copy_from_slice(&u.to_be_bytes());
            }
        }
    };
    text(&mut d, 8, 32, "");
    text(
        &mut d,
        40,
        32,
        &if names == Names::Iso {
            label.to_ascii_uppercase()
        } else {
            label.to_owned()
        },
    );
    d[80..88].copy_from_slice(&both32(sectors));
    if names == Names::Joliet {
        // UCS-2 level 3.
        d[88..91].copy_from_slice(b"%/E");
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(table_len));
    d[140..144].copy_from_slice(&l_table.to_le_bytes());
    d[148..152].copy_from_slice(&m_table.to_be_bytes());
    let mut root_record = Vec::new();
    record(
        &mut root_record,
        &[0],
        root,
        root_sectors * SECTOR as u32,
        true,
    );
    d[156..156 + 34].copy_from_slice(&root_record);
    for (at, len) in [(190, 128), (318, 128), (446, 128), (574, 128)] {
        text(&mut d, at, len, "");
    }
    text(&mut d, 574, 128, "PODVISOR");
    for (at, len) in [(702, 37), (739, 37), (776, 37)] {
        text(&mut d, at, len, "");
    }
    // Dates: creation and modification 2000-01-01, the others unset ("0" digits, offset 0).
    for (at, set) in [(813, true), (830, true), (847, false), (864, false)] {
        let digits: &[u8; 16] = if set {
            b"2000010100000000"
        } else {
            b"0000000000000000"
        };
        d[at..at + 16].copy_from_slice(digits);
    }
    d[881] = 1;
    d
}
