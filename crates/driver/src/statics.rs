//! Pre-provisioned (static) volumes on the node: a PersistentVolume's `volumeHandle`
//! `static:<pool>/<dir>` (and its `subPath` attribute) is given a volume record at its first
//! NodeStageVolume, so staging, publishing, stats and unmounting go through the node service
//! as for any volume; later calls carry the handle, which is mapped back to the record through
//! the publication at the path they name. The record goes with the volume's last mount; the
//! directory is never touched by a delete. Resolution and its refusals are the `static` pool
//! kind's (`crate::pool::static_dirs`).

use stowage_core::request::{static_sub_path, HostPath, StaticHandle, STATIC_PREFIX};
use stowage_core::{Error, Result, VolumeId};

use crate::engine::Engine;
use crate::pool::static_dirs::{record_name, RECORD_PREFIX};
use crate::store::{NewVolume, VolumeState};

impl Engine {
    /// The record of the static volume with handle `handle` for a NodeStageVolume (made on
    /// first use): checks that the handle names a `static` pool and the attributes only a
    /// `subPath`. None when `handle` is no static handle.
    pub fn static_volume_for_stage(
        &self,
        handle: &str,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<Option<VolumeId>> {
        let Some(parsed) = StaticHandle::parse(handle) else {
            return Ok(None);
        };
        let parsed = parsed?;
        let sub = static_sub_path(context)?;
        let pool = self.pools.get(&parsed.pool).ok_or_else(|| {
            Error::NotFound(format!(
                "volume_id {handle:?}: pool {:?} is not configured on this node",
                parsed.pool
            ))
        })?;
        if pool.backend().provisions() {
            return Err(Error::InvalidArgument(format!(
                "volume_id {handle:?}: pool {:?} is not a static pool",
                parsed.pool
            )));
        }
        let name = record_name(handle, sub.as_deref());
        let _guard = self.guards.claim(format!("volume name {name:?}"))?;
        if let Some(vol) = self.store.volume_by_name(&name)? {
            return Ok(Some(vol.id));
        }
        let id = VolumeId::generate();
        self.store.insert_volume(&NewVolume {
            id: &id,
            name: &name,
            pool: pool.name(),
            capacity: 0,
            block: false,
            pvc_name: None,
            pvc_namespace: None,
            pv_name: None,
            full_allocation: false,
            source: None,
            fs_type: None,
            block_size: None,
        })?;
        self.store.set_volume_state(&id, VolumeState::Ready)?;
        Ok(Some(id))
    }

    /// The record a later call's static handle means: the volume recorded at `path` (its
    /// staging, target or volume path), if that volume was staged from this handle. None when
    /// `handle` is no static handle; NOT_FOUND when nothing of it is at `path`.
    pub fn static_volume_at(
        &self,
        handle: &str,
        field: &str,
        path: &str,
    ) -> Result<Option<VolumeId>> {
        if !handle.starts_with(STATIC_PREFIX) {
            return Ok(None);
        }
        let not_here = || {
            Error::NotFound(format!(
                "static volume {handle:?} is not staged or published at {field} {path:?}"
            ))
        };
        let path = HostPath::parse(field, path).map_err(|_| not_here())?;
        let publication = self
            .store
            .publication_at(path.as_str())?
            .ok_or_else(not_here)?;
        let vol = self
            .store
            .volume_by_id(&publication.volume_id)?
            .ok_or_else(not_here)?;
        let prefix = format!("{RECORD_PREFIX}{handle}//");
        if !vol.name.starts_with(&prefix) {
            return Err(not_here());
        }
        Ok(Some(vol.id))
    }

    /// For a call that removes a mount (unpublish, unstage): what its `volume_id` names at
    /// `path`. A static handle with nothing of it there means there is nothing to remove.
    pub fn static_handle_at(&self, handle: &str, field: &str, path: &str) -> Result<HandleAt> {
        match self.static_volume_at(handle, field, path) {
            Ok(Some(id)) => Ok(HandleAt::Volume(id)),
            Ok(None) => Ok(HandleAt::NotStatic),
            Err(Error::NotFound(_)) => Ok(HandleAt::Nothing),
            Err(e) => Err(e),
        }
    }

    /// After a NodeStageVolume of a static volume failed: a static stage is one bind mount,
    /// made whole or not at all, so a `mounting` record it left names nothing mounted; it goes,
    /// and the volume's record with it when nothing else of it is mounted.
    pub fn forget_failed_static_stage(&self, id: &VolumeId) -> Result<()> {
        for p in self.store.publications_of(id)? {
            if p.state == crate::store::PublicationState::Mounting {
                self.store.remove_publication(&p.path)?;
            }
        }
        self.forget_static_if_unused(id)
    }

    /// After a NodeUnstageVolume of a static volume: its record goes once nothing of it is
    /// mounted any more (the directory stays as it is).
    pub fn forget_static_if_unused(&self, id: &VolumeId) -> Result<()> {
        let Some(vol) = self.store.volume_by_id(id)? else {
            return Ok(());
        };
        if !vol.name.starts_with(RECORD_PREFIX) || !self.store.publications_of(id)?.is_empty() {
            return Ok(());
        }
        let _guard = self.claim(id)?;
        self.store.remove_volume(id)
    }
}

/// What a static handle names at a path (see [`Engine::static_handle_at`]).
pub enum HandleAt {
    /// No static handle: the call goes on as for any volume.
    NotStatic,
    /// A static handle with nothing of it at the path.
    Nothing,
    /// The record of the static volume mounted there.
    Volume(VolumeId),
}

/// Whether a volume_id is a static handle (for requests that must refuse one).
pub fn is_static(volume_id: &str) -> bool {
    volume_id.starts_with(STATIC_PREFIX)
}
