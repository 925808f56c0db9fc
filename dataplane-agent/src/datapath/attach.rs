//! Attaching the program at tc ingress (tcx) of pod-facing interfaces, and keeping it there
//! across agent restarts: each link is pinned per interface; a restarted agent swaps its new
//! program into the pinned link atomically, so no packet passes unprocessed.
use std::collections::BTreeMap;

use anyhow::Context;
use aya::programs::{
    TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
};
use tracing::{info, warn};

use super::loader::LoadedDatapath;

/// Interfaces the program is attached to, by name, with the ifindex it was attached at.
#[derive(Default)]
pub struct Attachments {
    attached: BTreeMap<String, u32>,
    patterns: Vec<glob::Pattern>,
}

impl Attachments {
    pub fn new(globs: &[String]) -> anyhow::Result<Self> {
        let patterns = globs
            .iter()
            .map(|g| glob::Pattern::new(g).with_context(|| format!("invalid interface glob {g:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            attached: BTreeMap::new(),
            patterns,
        })
    }

    /// Attaches to every matching interface not yet attached (or recreated since).
    pub fn sync(&mut self, datapath: &mut LoadedDatapath) {
        let interfaces = match list_interfaces() {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, "cannot list interfaces");
                return;
            }
        };
        self.attached
            .retain(|name, index| interfaces.get(name) == Some(index));
        for (name, index) in interfaces {
            if self.attached.contains_key(&name) || !self.patterns.iter().any(|p| p.matches(&name))
            {
                continue;
            }
            match attach(datapath, &name) {
                Ok(how) => {
                    info!(interface = %name, ifindex = index, how, "datapath attached");
                    self.attached.insert(name, index);
                }
                // Interfaces come and go (a pod deleted mid-attach); retried next round.
                Err(e) => {
                    warn!(interface = %name, error = format!("{e:#}"), "cannot attach datapath")
                }
            }
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }
}

fn attach(datapath: &mut LoadedDatapath, interface: &str) -> anyhow::Result<&'static str> {
    let pin = datapath.layout.link(interface);
    if pin.exists() {
        match replace_program(datapath, &pin) {
            Ok(()) => return Ok("replaced program in pinned link"),
            Err(e) => {
                // The interface was recreated: the old link is defunct.
                info!(interface, reason = %e, "pinned link not reusable, attaching anew");
                std::fs::remove_file(&pin).ok();
            }
        }
    }
    let program = datapath.program();
    let id = program.attach(interface, TcAttachType::Ingress)?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    link.pin(&pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok("attached")
}

fn replace_program(datapath: &mut LoadedDatapath, pin: &std::path::Path) -> anyhow::Result<()> {
    let link = PinnedLink::from_pin(pin)?;
    let link = SchedClassifierLink::try_from(FdLink::from(link))
        .map_err(|e: LinkError| anyhow::anyhow!(e))?;
    let program = datapath.program();
    let id = program.attach_to_link(link)?;
    // The pin keeps the link; the program need not hold it.
    drop(program.take_link(id)?);
    Ok(())
}

/// Interfaces of this network namespace (by netlink, not /sys, which may show another one).
pub fn list_interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = BTreeMap::new();
        let mut entry = head;
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// Detaches every pinned link under the layout (used by `cleanup`).
pub fn detach_all(layout: &super::BpffsLayout) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(layout.links_dir()) else {
        return removed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match PinnedLink::from_pin(&path).map(|l| l.unpin()) {
            // Dropping the last reference to the link detaches it.
            Ok(Ok(link)) => {
                drop(link);
                removed.push(path.display().to_string());
            }
            _ => {
                if std::fs::remove_file(&path).is_ok() {
                    removed.push(path.display().to_string());
                }
            }
        }
    }
    removed
}
