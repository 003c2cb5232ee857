//! The spec's translation, on VMIs written as KubeVirt users write them.

use std::path::PathBuf;

use super::translate::{Prepare, Source};
use super::*;

fn options(no_network: bool) -> Options {
    Options {
        layout: PodLayout::new("/pod"),
        no_network,
    }
}

fn launch(yaml: &str) -> Result<translate::Launch, Vec<String>> {
    let vmi = parse(yaml).map_err(|e| vec![e])?;
    translate(&vmi, &options(false)).map_err(|e| e.0)
}

/// Each of `expected` starts one of `errs`.
fn assert_all_start(errs: &[String], expected: &[&str]) {
    for e in expected {
        assert!(
            errs.iter().any(|x| x.starts_with(e)),
            "no '{e}' in:\n{}",
            errs.join("\n")
        );
    }
}

fn errors(yaml: &str) -> Vec<String> {
    launch(yaml).expect_err("the spec should be refused")
}

const KERNEL_BOOT: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec:
  terminationGracePeriodSeconds: 45
  domain:
    cpu: {cores: 2, sockets: 1, threads: 1}
    memory: {guest: 1Gi}
    firmware:
      uuid: 5d307ca9-b3ef-428c-8861-06e72d69f223
      kernelBoot:
        kernelArgs: "root=/dev/vda quiet"
        container:
          image: registry.example/kernels:6.1
          kernelPath: /boot/vmlinuz
          initrdPath: /boot/initrd.img
    devices:
      rng: {}
      disks:
      - name: root
        disk: {bus: virtio}
        bootOrder: 1
        cache: none
      - name: data
        serial: DATA0001
      - name: seed
        cdrom: {bus: virtio}
  volumes:
  - name: root
    containerDisk: {image: registry.example/debian:12}
  - name: data
    persistentVolumeClaim: {claimName: web-data}
  - name: seed
    cloudInitNoCloud:
      userData: |
        #cloud-config
        hostname: web-1
  - name: scratch
    emptyDisk: {capacity: 2Gi}
"#;

#[test]
fn a_kernel_boot_vmi_becomes_a_vm_config() {
    let l = launch(KERNEL_BOOT).unwrap();
    assert_eq!((l.name.as_str(), l.namespace.as_str()), ("web-1", "shop"));
    assert_eq!(l.grace_period_s, 45);
    let c = &l.config;
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(c.memory.size, 1 << 30);
    assert_eq!(
        c.payload.kernel,
        Some(PathBuf::from(
            "/pod/var/run/kubevirt/container-disks/kernel-boot/boot/vmlinuz"
        ))
    );
    assert_eq!(
        c.payload.initramfs.as_deref(),
        Some(
            PathBuf::from("/pod/var/run/kubevirt/container-disks/kernel-boot/boot/initrd.img")
                .as_path()
        )
    );
    assert_eq!(c.payload.cmdline, "root=/dev/vda quiet console=ttyS0");
    assert!(c.rng.is_some());
    // Disks in the spec's order, then the volume no disk names.
    let ids: Vec<_> = c.disks.iter().map(|d| d.id.clone().unwrap()).collect();
    assert_eq!(ids, ["root", "data", "seed", "scratch"]);
    let root = &c.disks[0];
    assert_eq!(
        root.path,
        PathBuf::from("/pod/var/run/kubevirt-ephemeral-disks/disk-data/root/disk.qcow2")
    );
    assert_eq!(root.format.as_deref(), Some("qcow2"));
    assert!(root.direct && !root.readonly);
    // The overlay may name the containerDisk's image as its backing file, and nothing else.
    assert_eq!(
        root.backing_files,
        vmm::config::BackingFilesConfig::Under(
            "/pod/var/run/kubevirt/container-disks/disk_0.img".into()
        )
    );
    let data = &c.disks[1];
    assert_eq!(
        data.path,
        PathBuf::from("/pod/var/run/kubevirt-private/vmi-disks/data/disk.img")
    );
    // A claim's image is raw, always: never probed.
    assert_eq!(data.format.as_deref(), Some("raw"));
    assert!(data.backing_files.is_off());
    assert_eq!(data.serial.as_deref(), Some("DATA0001"));
    let seed = &c.disks[2];
    assert!(seed.readonly, "a CD-ROM is read-only");
    assert_eq!(
        seed.path,
        PathBuf::from(
            "/pod/var/run/kubevirt-ephemeral-disks/cloud-init-data/shop/web-1/noCloud.iso"
        )
    );
    assert_eq!(
        l.prepare[0],
        Prepare::Overlay {
            path: root.path.clone(),
            base: "/pod/var/run/kubevirt/container-disks/disk_0.img".into(),
        }
    );
    match &l.prepare[2] {
        Prepare::CloudInit {
            config_drive,
            instance_id,
            hostname,
            user_data: Source::Text(text),
            network_data: None,
            ..
        } => {
            assert!(!config_drive);
            assert_eq!(instance_id, "web-1.shop");
            assert_eq!(hostname, "web-1");
            assert!(text.starts_with("#cloud-config\nhostname: web-1"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        l.prepare[3],
        Prepare::EmptyDisk {
            path: "/pod/var/run/kubevirt-ephemeral-disks/empty-disks/scratch.qcow2".into(),
            size: 2 << 30,
        }
    );
    // Harmless fields are left aside, each with a warning that names it.
    assert!(l
        .warnings
        .iter()
        .any(|w| w.starts_with("metadata.labels: ignored")));
    // The firmware's UUID becomes the guest's SMBIOS system UUID.
    let platform = c.platform.as_ref().unwrap();
    assert_eq!(
        platform.uuid.as_deref(),
        Some("5d307ca9-b3ef-428c-8861-06e72d69f223")
    );
    assert_eq!(platform.serial_number, None);
    // The configuration is one podvisor accepts.
    c.validate().unwrap();
}

#[test]
fn memory_from_requests_cpu_topology_and_defaults() {
    let l = launch(
        r#"{"metadata": {"name": "small"},
            "spec": {"domain": {"resources": {"requests": {"memory": "1G", "cpu": "2"},
                                              "limits": {"memory": "2G"}},
                                "cpu": {"sockets": 2, "cores": 2, "threads": 2},
                                "firmware": {"kernelBoot": {"container": {
                                    "image": "k", "kernelPath": "/vmlinux"}}}}}}"#,
    )
    .unwrap();
    assert_eq!(l.namespace, "default");
    assert_eq!(l.grace_period_s, 30);
    assert_eq!(l.config.cpus.boot_vcpus, 8);
    assert_eq!(
        l.config.cpus.topology,
        Some(vmm::config::CpuTopology::new(2, 2, 1, 2))
    );
    // 1G = 10^9 bytes, rounded up to whole MiB.
    assert_eq!(l.config.memory.size, 954 << 20);
    assert_eq!(l.config.payload.cmdline, "console=ttyS0");
    assert!(l.config.payload.initramfs.is_none() && l.config.disks.is_empty());
    assert!(l
        .warnings
        .iter()
        .any(|w| w.starts_with("spec.domain.resources.limits")));
}

#[test]
fn hugepages_back_the_guest_memory() {
    let vmi = |memory: &str| {
        launch(&format!(
            r#"{{"metadata": {{"name": "h"}},
                "spec": {{"domain": {{"memory": {memory},
                                    "firmware": {{"kernelBoot": {{"container": {{
                                        "image": "k", "kernelPath": "/vmlinux"}}}}}}}}}}}}"#
        ))
    };
    let m = vmi(r#"{"guest": "1Gi", "hugepages": {"pageSize": "2Mi"}}"#)
        .unwrap()
        .config
        .memory;
    assert_eq!(
        (m.size, m.hugepages, m.hugepage_size),
        (1 << 30, true, Some(2 << 20))
    );
    let errs = vmi(r#"{"guest": "1536Mi", "hugepages": {"pageSize": "1Gi"}}"#).unwrap_err();
    assert_all_start(
        &errs,
        &["spec.domain.memory.guest: 1536 MiB is not a whole number of 1024 MiB huge pages"],
    );
    let errs = vmi(r#"{"guest": "1Gi", "hugepages": {}}"#).unwrap_err();
    assert_all_start(&errs, &["spec.domain.memory.hugepages.pageSize: missing"]);
}

#[test]
fn without_sockets_and_cores_the_cpu_limit_counts_sockets() {
    let vmi = |resources: &str, cpu: &str| {
        launch(&format!(
            r#"{{"metadata": {{"name": "c"}},
                "spec": {{"domain": {{"resources": {resources}, {cpu}
                                    "memory": {{"guest": "1Gi"}},
                                    "firmware": {{"kernelBoot": {{"container": {{
                                        "image": "k", "kernelPath": "/vmlinux"}}}}}}}}}}}}"#
        ))
    };
    let topology = |l: &translate::Launch| {
        let t = l.config.cpus.topology.unwrap();
        (
            l.config.cpus.boot_vcpus,
            t.threads_per_core,
            t.cores_per_die,
            t.packages,
        )
    };
    let l = vmi(
        r#"{"limits": {"cpu": "3"}, "requests": {"cpu": "500m"}}"#,
        "",
    )
    .unwrap();
    assert_eq!(topology(&l), (3, 1, 1, 3));
    let l = vmi(r#"{"requests": {"cpu": "1500m"}}"#, "").unwrap();
    assert_eq!(topology(&l), (2, 1, 1, 2));
    // Threads alone still multiply.
    let l = vmi(r#"{"requests": {"cpu": "2"}}"#, r#""cpu": {"threads": 2},"#).unwrap();
    assert_eq!(topology(&l), (4, 2, 1, 2));
    // Nothing: one vCPU.
    let l = vmi("{}", "").unwrap();
    assert_eq!(topology(&l), (1, 1, 1, 1));
    let errs = vmi(r#"{"requests": {"cpu": "lots"}}"#, "").unwrap_err();
    assert_all_start(
        &errs,
        &["spec.domain.resources.requests.cpu: \"lots\" is not a CPU quantity"],
    );
}

#[test]
fn every_problem_is_named_by_its_field() {
    let errs = errors(
        r#"
apiVersion: kubevirt.io/v2
kind: VirtualMachineInstance
metadata: {name: Bad_Name}
spec:
  domain:
    cpu: {cores: 300}
    memory: {guest: 16Mi, hugepages: {pageSize: 4Mi}}
    firmware:
      uuid: 5d307ca9-b3ef-428c-8861
      bootloader: {efi: {}}
      kernelBoot:
        container: {image: k, kernelPath: ../etc/shadow}
    devices:
      sound: {name: s}
      disks:
      - name: a
        disk: {bus: sata}
      - name: a
      - name: c
        cdrom: {}
        bootOrder: 2
        cache: writethrough
      - name: d
        bootOrder: 2
        serial: "123456789012345678901"
      - name: missing
  volumes:
  - name: c
    containerDisk: {image: img}
  - name: d
    hostDisk: {path: relative.img, type: Maybe}
  - name: a
    configMap: {name: cm}
  - name: e
    containerDisk: {image: x}
    emptyDisk: {capacity: 1Gi}
  - name: c
    emptyDisk: {capacity: lots}
"#,
    );
    assert_all_start(
        &errs,
        &[
        "apiVersion: 'kubevirt.io/v2', expected kubevirt.io/v1",
        "metadata.name: 'Bad_Name' is not a DNS label",
        "spec.domain.cpu: cores × sockets × threads is 300",
        "spec.domain.memory.guest: 16777216 bytes; podvisor needs at least 32 MiB",
        "spec.domain.memory.hugepages.pageSize: 4Mi is not 2Mi or 1Gi",
        "spec.domain.firmware.bootloader.efi.secureBoot: Secure Boot needs UEFI firmware",
        "spec.domain.firmware.uuid: '5d307ca9-b3ef-428c-8861' is not a UUID",
        "spec.domain.firmware.kernelBoot.container.kernelPath: '../etc/shadow' must be an absolute path",
        "spec.domain.devices.sound: not supported by podvisor",
        "spec.domain.devices.disks[0].disk.bus: 'sata' is not supported",
        "spec.domain.devices.disks[1].name: 'a' is also disks[0]",
        "spec.domain.devices.disks[2].cdrom.bus: 'sata' is not supported",
        "spec.domain.devices.disks[2].cache: 'writethrough' is not supported",
        "spec.domain.devices.disks[3].bootOrder: 2 is also the boot order of disks[2]",
        "spec.domain.devices.disks[3].serial: '123456789012345678901' is longer than 20 bytes",
        "spec.domain.devices.disks[4].name: no volume named 'missing' in spec.volumes",
        "spec.volumes[1].hostDisk.path: missing, or not an absolute path",
        "spec.volumes[1].hostDisk.type: Some(\"Maybe\"): Disk or DiskOrCreate",
        "spec.volumes[2].configMap: not supported by podvisor",
        "spec.volumes[3]: more than one volume source",
        "spec.volumes[4].name: a second volume named 'c'",
    ],
    );
}

#[test]
fn interfaces_are_checked_and_bound_by_masquerade_or_left_out() {
    let yaml = r#"
metadata: {name: net}
spec:
  domain:
    memory: {guest: 256Mi}
    firmware: {kernelBoot: {container: {image: k, kernelPath: /k}}}
    devices:
      interfaces:
      - name: default
        masquerade: {}
        ports: [{port: 80}, {name: bad}]
      - name: blue
        bridge: {}
        macAddress: "02:00:00:00:00:0g"
      - name: red
        sriov: {}
      - name: default
        bridge: {}
        masquerade: {}
        model: e1000
  networks:
  - name: default
    pod: {}
  - name: blue
    multus: {networkName: blue-net}
"#;
    let errs = errors(yaml);
    assert_all_start(
        &errs,
        &[
        "spec.domain.devices.interfaces[0].ports[1].port: missing",
        "spec.domain.devices.interfaces[1].macAddress: '02:00:00:00:00:0g' is not a MAC address",
        "spec.domain.devices.interfaces[2].sriov: not supported",
        "spec.domain.devices.interfaces[2].name: no network named 'red'",
        "spec.domain.devices.interfaces[3]: more than one binding: bridge, masquerade",
        "spec.domain.devices.interfaces[3].model: 'e1000' is not supported",
        "spec.domain.devices.interfaces[3].name: network 'default' already has interfaces[0]",
    ],
    );
    // A spec whose interfaces are right starts without them under --no-network.
    let good = r#"
metadata: {name: net}
spec:
  domain:
    memory: {guest: 256Mi}
    firmware: {kernelBoot: {container: {image: k, kernelPath: /k}}}
    devices:
      interfaces: [{name: default, masquerade: {}}]
  networks: [{name: default, pod: {}}]
"#;
    // Masquerade on the pod network, its ports as the NAT will forward them.
    let l = launch(&good.replace(
        "masquerade: {}}]",
        "masquerade: {}, ports: [{port: 80}, {port: 53, protocol: UDP}]}]",
    ))
    .unwrap();
    assert_eq!(
        l.nics[0].kind,
        crate::podnet::bridge::Kind::Masquerade {
            ports: vec![(6, 80), (17, 53)]
        }
    );
    assert_eq!(l.nics[0].pod_interface, "eth0");
    let sctp = good.replace(
        "masquerade: {}}]",
        "masquerade: {}, ports: [{port: 80, protocol: SCTP}]}]",
    );
    assert_all_start(
        &errors(&sctp),
        &["spec.domain.devices.interfaces[0].ports[0].protocol: 'SCTP' is not TCP or UDP"],
    );
    // Only the pod network is masqueraded.
    let multus = good.replace("pod: {}", "multus: {networkName: blue}");
    assert_all_start(
        &errors(&multus),
        &["spec.domain.devices.interfaces[0].masquerade: masquerade binds the pod network only"],
    );
    let l = translate(&parse(good).unwrap(), &options(true)).unwrap();
    assert!(l.config.net.is_empty() && l.nics.is_empty());
    assert!(l.warnings.iter().any(|w| w.contains("--no-network")));
}

#[test]
fn bridge_bindings_become_nics_on_taps_bridged_to_their_pod_interfaces() {
    let yaml = r#"
metadata: {name: web, namespace: shop}
spec:
  domain:
    memory: {guest: 256Mi}
    firmware: {kernelBoot: {container: {image: k, kernelPath: /k}}}
    devices:
      interfaces:
      - {name: default, bridge: {}}
      - {name: storage, bridge: {}, macAddress: "02-aa-bb-cc-dd-ee"}
      - {name: blue, bridge: {}}
  networks:
  - {name: default, pod: {}}
  - {name: blue, multus: {networkName: blue-net}}
  - {name: storage, multus: {networkName: storage-net}}
"#;
    let l = launch(yaml).unwrap();
    let wired: Vec<(&str, &str, &str)> = l
        .nics
        .iter()
        .map(|n| (n.pod_interface.as_str(), n.bridge.as_str(), n.tap.as_str()))
        .collect();
    // Multus networks are net1, net2, ... in the order of spec.networks.
    assert_eq!(
        wired,
        [
            ("eth0", "k6t-eth0", "tap0"),
            ("net2", "k6t-net2", "tap1"),
            ("net1", "k6t-net1", "tap2"),
        ]
    );
    assert_eq!(l.nics[1].mac, [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    let macs: Vec<_> = l
        .config
        .net
        .iter()
        .map(|n| n.mac.clone().unwrap())
        .collect();
    assert_eq!(macs[1], "02:aa:bb:cc:dd:ee");
    assert_eq!(l.config.net[0].tap.as_deref(), Some("tap0"));
    // A derived MAC: locally administered, unicast, the same for the same VMI anywhere, and
    // another for another VMI.
    assert_eq!(l.nics[0].mac[0], 0x02);
    assert_eq!(launch(yaml).unwrap().nics[0].mac, l.nics[0].mac);
    let other = launch(&yaml.replace("name: web", "name: db")).unwrap();
    assert_ne!(other.nics[0].mac, l.nics[0].mac);
    let multicast = yaml.replace("02-aa-bb-cc-dd-ee", "03:00:00:00:00:01");
    assert_all_start(
        &errors(&multicast),
        &["spec.domain.devices.interfaces[1].macAddress: '03:00:00:00:00:01' is a multicast address"],
    );
}

#[test]
fn cloud_init_sources() {
    let yaml = |volume: &str| {
        format!(
            r#"
metadata: {{name: ci, namespace: ns}}
spec:
  domain:
    memory: {{guest: 256Mi}}
    firmware: {{kernelBoot: {{container: {{image: k, kernelPath: /k}}}}}}
  volumes:
  - name: seed
    {volume}
"#
        )
    };
    let l = launch(&yaml(
        "cloudInitConfigDrive: {userDataBase64: I2Nsb3VkLWNvbmZpZwo=, networkData: 'version: 2'}",
    ))
    .unwrap();
    match &l.prepare[0] {
        Prepare::CloudInit {
            path,
            config_drive: true,
            user_data: Source::Text(user),
            network_data: Some(Source::Text(net)),
            ..
        } => {
            assert_eq!(user, "#cloud-config\n");
            assert_eq!(net, "version: 2");
            assert!(path.ends_with("cloud-init-data/ns/ci/configdrive.iso"));
        }
        other => panic!("{other:?}"),
    }
    assert!(l.config.disks[0].readonly);
    let l = launch(&yaml(
        "cloudInitNoCloud: {userDataSecretRef: {name: my-secret}}",
    ))
    .unwrap();
    match &l.prepare[0] {
        Prepare::CloudInit {
            user_data: Source::Secret(file),
            ..
        } => assert_eq!(
            file,
            &PathBuf::from("/pod/var/run/kubevirt-private/secret/seed/userdata")
        ),
        other => panic!("{other:?}"),
    }
    let errs = errors(&yaml("cloudInitNoCloud: {userDataBase64: '!!!'}"));
    assert!(
        errs[0].ends_with("userDataBase64: not base64 of UTF-8 text"),
        "{errs:?}"
    );
    let errs = errors(&yaml("cloudInitNoCloud: {networkData: x}"));
    assert!(errs[0].contains("no userData"), "{errs:?}");
    let errs = errors(&yaml(
        "cloudInitNoCloud: {userData: a, userDataBase64: YQ==}",
    ));
    assert!(errs[0].contains("more than one of userData"), "{errs:?}");
}

#[test]
fn documents_that_are_not_vmis() {
    assert!(parse("a: [")
        .unwrap_err()
        .starts_with("not a YAML or JSON document"));
    assert!(parse("- 1").unwrap_err().contains("not an object"));
    let e = parse("metadata: {name: x}\nspec: {domain: {cpu: {cores: two}}}").unwrap_err();
    assert!(e.starts_with("spec.domain.cpu.cores: invalid type"), "{e}");
    let e = parse("metadata: {name: x}").unwrap_err();
    assert!(e.contains("missing field `spec`"), "{e}");
    let errs = errors("metadata: {}\nspec: {domain: {}}");
    assert!(errs
        .iter()
        .any(|e| e.starts_with("metadata.name: '' is not a DNS label")));
    assert!(errs
        .iter()
        .any(|e| e.starts_with("spec.domain.memory.guest: no guest memory")));
}

#[test]
fn a_vmi_without_kernel_boot_boots_its_disks_in_boot_order() {
    let yaml = r#"
metadata: {name: cloud}
spec:
  domain:
    memory: {guest: 1Gi}
    firmware: {bootloader: {efi: {secureBoot: false}}}
    devices:
      disks:
      - {name: data, disk: {}}
      - {name: root, disk: {}, bootOrder: 1}
  volumes:
  - {name: data, emptyDisk: {capacity: 1Gi}}
  - {name: root, containerDisk: {image: debian:12}}
"#;
    let l = launch(yaml).unwrap();
    let p = &l.config.payload;
    assert_eq!(
        (&p.kernel, &p.initramfs, p.cmdline.as_str()),
        (&None, &None, "")
    );
    let orders: Vec<Option<u32>> = l.config.disks.iter().map(|d| d.boot_order).collect();
    assert_eq!(
        orders,
        [None, Some(1)],
        "the guest's disk order stays the spec's"
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.starts_with("spec.domain.firmware.bootloader.efi: ignored")),
        "{:?}",
        l.warnings
    );
    // No firmware at all is the same disk boot; BIOS too.
    let l = launch(&yaml.replace(
        "    firmware: {bootloader: {efi: {secureBoot: false}}}\n",
        "",
    ))
    .unwrap();
    assert_eq!(l.config.payload.kernel, None);
    let l = launch(&yaml.replace("efi: {secureBoot: false}", "bios: {}")).unwrap();
    assert_eq!(l.config.payload.kernel, None);
    // Secure Boot (the default with efi) needs firmware that checks signatures.
    for efi in ["efi: {}", "efi: {secureBoot: true}"] {
        assert_all_start(
            &errors(&yaml.replace("efi: {secureBoot: false}", efi)),
            &["spec.domain.firmware.bootloader.efi.secureBoot: Secure Boot needs UEFI firmware"],
        );
    }
}
