//! CSI ephemeral inline volumes: a NodePublishVolume with `csi.storage.k8s.io/ephemeral:
//! "true"` makes a volume on the spot (pool and size from the pod's volume attributes),
//! stages it at a staging directory of the driver's own under the kubelet directory and
//! publishes it; the NodeUnpublishVolume of the kubelet's handle unpublishes, unstages and
//! deletes it. The volume is named `ephemeral/<handle>`, so the handle finds it again after a
//! restart; at start, an ephemeral volume with no publication left (a crash between the
//! create and the publish, or after the unpublish) is unstaged and deleted.

use std::path::PathBuf;

use stowage_core::ids::VolumeRef;
use stowage_core::request::{
    ephemeral_name, CapacityRange, CreateVolume, DeleteVolume, EphemeralPublish, ExistingPath,
    HostPath, NodePublish, NodeStage, NodeUnpublish, NodeUnstage, EPHEMERAL_NAME_PREFIX,
};
use stowage_core::{Error, Result, VolumeId};
use stowage_sys::fs as sysfs;

use crate::engine::Engine;
use crate::store::{PublicationKind, VolumeRecord, VolumeState};

/// Where ephemeral volumes are staged, under the first kubelet directory.
const STAGING_DIR: &str = "plugins/stowage-ephemeral";

impl Engine {
    /// The staging path of ephemeral volume `id` (made if missing).
    fn ephemeral_staging(&self, id: &VolumeId) -> Result<HostPath> {
        let kubelet = self.kubelet_dirs.first().ok_or_else(|| {
            Error::FailedPrecondition("no kubelet directory is configured".to_owned())
        })?;
        let path: PathBuf = kubelet.join(STAGING_DIR).join(id.as_str());
        // The kubelet directory and its plugins directory are root's: no pod writes there.
        sysfs::create_trusted_dir_all(&path)
            .map_err(|e| Error::internal(format!("creating {}", path.display()), e))?;
        HostPath::parse("staging_target_path", &path.to_string_lossy())
    }

    /// NodePublishVolume of an ephemeral inline volume: create (idempotent by the handle's
    /// name), stage, publish.
    pub fn ephemeral_publish(&self, req: EphemeralPublish) -> Result<()> {
        let size = req.size.map(|s| CapacityRange {
            required: s,
            limit: Some(s.max(crate::pool::SIZE_GRANULE)),
        });
        let vol = self.create_volume(CreateVolume {
            name: req.name,
            capacity: size.unwrap_or_default(),
            capabilities: vec![req.capability.clone()],
            params: req.params,
            topology: None,
            source: None,
        })?;
        crate::crash::point("ephemeral-after-create");
        let id = VolumeId::parse(&vol.volume_id).map_err(|_| {
            Error::Internal(format!("minted an id of another shape: {}", vol.volume_id))
        })?;
        let staging = self.ephemeral_staging(&id)?;
        self.node_stage(NodeStage {
            volume: VolumeRef::Ours(id.clone()),
            staging: staging.clone(),
            capability: req.capability.clone(),
        })?;
        self.node_publish(NodePublish {
            volume: VolumeRef::Ours(id),
            staging,
            target: req.target,
            capability: req.capability,
            readonly: req.readonly,
        })
    }

    /// The volume made for the kubelet's handle `handle`, when it names an ephemeral one.
    pub fn ephemeral_volume(&self, handle: &str) -> Result<Option<VolumeRecord>> {
        if VolumeId::parse(handle).is_ok() {
            return Ok(None);
        }
        let Ok(name) = ephemeral_name(handle) else {
            return Ok(None);
        };
        self.store.volume_by_name(name.as_str())
    }

    /// Whether an unpublish of `handle` at `target` is the retry of one that finished: the
    /// handle has the shape of an ephemeral one (not a volume id of ours) and nothing of ours
    /// is published at the target any more.
    pub fn ephemeral_gone(&self, handle: &str, target: &str) -> Result<bool> {
        if VolumeId::parse(handle).is_ok() || ephemeral_name(handle).is_err() {
            return Ok(false);
        }
        let Ok(target) = HostPath::parse("target_path", target) else {
            return Ok(false);
        };
        Ok(self.store.publication_at(target.as_str())?.is_none())
    }

    /// NodeUnpublishVolume of an ephemeral volume: unpublish, unstage, delete. Each step is
    /// idempotent, so a retry after any failure finishes the rest.
    pub fn ephemeral_unpublish(&self, vol: &VolumeRecord, target: ExistingPath) -> Result<()> {
        self.node_unpublish(NodeUnpublish {
            volume: VolumeRef::Ours(vol.id.clone()),
            target,
        })?;
        self.ephemeral_release(vol)
    }

    /// Unstages and deletes an ephemeral volume that has no publication left.
    fn ephemeral_release(&self, vol: &VolumeRecord) -> Result<()> {
        let staging = self.ephemeral_staging(&vol.id)?;
        self.node_unstage(NodeUnstage {
            volume: VolumeRef::Ours(vol.id.clone()),
            staging: ExistingPath::Host(staging.clone()),
        })?;
        match std::fs::remove_dir(staging.as_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %staging.as_str(), error = %e, "could not remove an ephemeral staging directory")
            }
        }
        self.delete_volume(DeleteVolume {
            volume: VolumeRef::Ours(vol.id.clone()),
        })
    }

    /// At start, after the publications were checked: ephemeral volumes that no pod has
    /// published any more are removed (failures are logged; the next start tries again).
    pub(crate) fn reconcile_ephemeral(&self) -> Result<()> {
        for vol in self.store.volumes_named_like(EPHEMERAL_NAME_PREFIX)? {
            if vol.state != VolumeState::Ready {
                continue;
            }
            let published = self
                .store
                .publications_of(&vol.id)?
                .iter()
                .any(|p| p.kind == PublicationKind::Publish);
            if published {
                continue;
            }
            match self.ephemeral_release(&vol) {
                Ok(()) => {
                    tracing::info!(volume = %vol.id, name = %vol.name, "ephemeral volume no pod uses any more: removed")
                }
                Err(e) => {
                    tracing::warn!(volume = %vol.id, error = %e, "could not remove an unused ephemeral volume")
                }
            }
        }
        Ok(())
    }
}
