//! The pool configuration (`--config`, TOML). Parsing and checking only; the driver opens the
//! pools.
//!
//! ```toml
//! [[pool]]
//! name = "fast"
//! kind = "dir"
//! path = "/mnt/nvme0/stowage"
//! default_size = "1Gi"
//!
//! [[pool]]
//! name = "hard"
//! kind = "image"              # a sparse image file per volume on a loop device
//! path = "/mnt/data/stowage-images"
//! overcommit_ratio = 1.0      # optional; above 1.0 sparse images may promise more than the disk has
//! ```

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::size::parse_size;
use crate::{Error, Result};

/// Size given to a volume whose request names no capacity, unless the pool says otherwise.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// The name of the pool used when a StorageClass names none and no config is given.
pub const DEFAULT_POOL: &str = "default";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The pools of this node; the first one is the default.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Advertised as `max_volumes_per_node` by NodeGetInfo when set.
    #[serde(default)]
    pub max_volumes_per_node: Option<i64>,
}

/// Backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// A directory per volume, capacity by project quota where the filesystem has it.
    Dir,
    /// A sparse image file per volume on a loop device: hard capacity on any filesystem.
    Image,
    /// A btrfs subvolume per volume, capacity by a qgroup limit.
    Btrfs,
    /// Directories an operator made, beneath the pool's path: pre-provisioned (static)
    /// volumes, never created nor deleted by the driver.
    Static,
}

/// What a `btrfs` pool may do about the filesystem's quotas (`quotas = "…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPolicy {
    /// Turn them on at start when they are off (simple quotas where the kernel has them).
    #[default]
    Enable,
    /// They must be on already (the operator chose the mode); the pool refuses to open
    /// otherwise.
    Require,
}

impl PoolKind {
    /// The name used in configs and volume contexts.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Dir => "dir",
            PoolKind::Image => "image",
            PoolKind::Btrfs => "btrfs",
            PoolKind::Static => "static",
        }
    }
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Name a StorageClass uses in its `pool` parameter.
    pub name: String,
    /// Backend kind.
    pub kind: PoolKind,
    /// Absolute host directory the pool lives in (created if missing).
    pub path: PathBuf,
    /// Size of volumes whose request names none (`1Gi` when absent).
    #[serde(default)]
    pub default_size: Option<String>,
    /// `image` pools only: how far the sizes of all volumes together may exceed the pool
    /// filesystem's size (1.0, the default: not at all — the unallocated part of every sparse
    /// image counts as taken, so a volume can always write its whole size).
    #[serde(default)]
    pub overcommit_ratio: Option<f64>,
    /// `btrfs` only: whether stowage may enable quotas or requires them on (default: enable).
    #[serde(default)]
    pub quotas: Option<QuotaPolicy>,
    /// `btrfs` only: GetCapacity ignores the limits already given to volumes (default false).
    #[serde(default)]
    pub overcommit: Option<bool>,
    /// `dir` pools only: how NodeGetVolumeStats measures a volume whose size is advisory (a
    /// walk of its tree); `[pool.stats]`.
    #[serde(default)]
    pub stats: Option<StatsConfig>,
}

/// The minimum age of a volume's usage figure before it is measured again.
pub const DEFAULT_STATS_MIN_AGE: Duration = Duration::from_secs(30);
/// How long one NodeGetVolumeStats call may walk a volume's tree.
pub const DEFAULT_STATS_WALK_BUDGET: Duration = Duration::from_secs(2);

/// `[pool.stats]` of a `dir` pool: the usage of a volume without project quota is a walk of
/// its tree, which NodeGetVolumeStats bounds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    /// A figure younger than this is answered without walking (`"30s"` by default; `"0s"`:
    /// always walk).
    #[serde(default)]
    pub min_age: Option<String>,
    /// The most one call walks (`"2s"` by default, 10 ms to 1 min); a walk that needs more
    /// stops there and continues at the next call, which answers the last complete figure
    /// meanwhile.
    #[serde(default)]
    pub walk_budget: Option<String>,
}

impl StatsConfig {
    /// The minimum age (0 to 1 hour).
    pub fn min_age(&self) -> Result<Duration> {
        let d = match &self.min_age {
            None => return Ok(DEFAULT_STATS_MIN_AGE),
            Some(s) => parse_duration(s)?,
        };
        if d > Duration::from_secs(3600) {
            return Err(Error::invalid(format!(
                "stats min_age {d:?} is more than an hour"
            )));
        }
        Ok(d)
    }

    /// The walk budget (10 ms to 1 minute).
    pub fn walk_budget(&self) -> Result<Duration> {
        let d = match &self.walk_budget {
            None => return Ok(DEFAULT_STATS_WALK_BUDGET),
            Some(s) => parse_duration(s)?,
        };
        if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
            return Err(Error::invalid(format!(
                "stats walk_budget {d:?} must be between 10ms and 60s"
            )));
        }
        Ok(d)
    }
}

/// A duration written as a whole number and a unit: `ms`, `s` or `m` (`"500ms"`, `"30s"`).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid(format!(
            "duration {text:?}: expected a whole number followed by ms, s or m"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
}

impl PoolConfig {
    /// The default volume size in bytes.
    pub fn default_size_bytes(&self) -> Result<u64> {
        match &self.default_size {
            None => Ok(DEFAULT_VOLUME_SIZE),
            Some(s) => parse_size(s),
        }
    }
}

impl Config {
    /// Parses and checks a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| Error::invalid(format!("config: {e}")))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The embedded default: one `dir` pool named `default` under the state directory.
    pub fn embedded_default(state_dir: &Path) -> Self {
        Config {
            pools: vec![PoolConfig {
                name: DEFAULT_POOL.to_owned(),
                kind: PoolKind::Dir,
                path: state_dir.join("pools").join(DEFAULT_POOL),
                default_size: None,
                overcommit_ratio: None,
                quotas: None,
                overcommit: None,
                stats: None,
            }],
            max_volumes_per_node: None,
        }
    }

    /// Checks names, paths and sizes.
    pub fn check(&self) -> Result<()> {
        if self.pools.is_empty() {
            return Err(Error::invalid("config: at least one [[pool]] is required"));
        }
        let mut names = BTreeSet::new();
        for pool in &self.pools {
            check_pool_name(&pool.name)?;
            if !names.insert(pool.name.as_str()) {
                return Err(Error::invalid(format!(
                    "config: pool {:?} is declared twice",
                    pool.name
                )));
            }
            if !pool.path.is_absolute()
                || pool
                    .path
                    .components()
                    .any(|c| matches!(c, Component::ParentDir))
            {
                return Err(Error::invalid(format!(
                    "config: pool {:?} path {:?} must be absolute and free of '..'",
                    pool.name, pool.path
                )));
            }
            pool.default_size_bytes()
                .map_err(|e| Error::invalid(format!("config: pool {:?}: {e}", pool.name)))?;
            if pool.kind != PoolKind::Btrfs {
                for (key, set) in [
                    ("quotas", pool.quotas.is_some()),
                    ("overcommit", pool.overcommit.is_some()),
                ] {
                    if set {
                        return Err(Error::invalid(format!(
                            "config: pool {:?}: {key} applies to btrfs pools only, this one is {}",
                            pool.name,
                            pool.kind.as_str()
                        )));
                    }
                }
            }
            if let Some(stats) = &pool.stats {
                if pool.kind != PoolKind::Dir {
                    return Err(Error::invalid(format!(
                        "config: pool {:?}: stats applies to dir pools only",
                        pool.name
                    )));
                }
                stats
                    .min_age()
                    .and(stats.walk_budget())
                    .map_err(|e| Error::invalid(format!("config: pool {:?}: {e}", pool.name)))?;
            }
            if let Some(ratio) = pool.overcommit_ratio {
                if pool.kind != PoolKind::Image {
                    return Err(Error::invalid(format!(
                        "config: pool {:?}: overcommit_ratio applies to image pools only",
                        pool.name
                    )));
                }
                if !(ratio.is_finite() && (1.0..=100.0).contains(&ratio)) {
                    return Err(Error::invalid(format!(
                        "config: pool {:?}: overcommit_ratio {ratio} must be between 1.0 and 100",
                        pool.name
                    )));
                }
            }
        }
        if let Some(n) = self.max_volumes_per_node {
            if n <= 0 {
                return Err(Error::invalid(
                    "config: max_volumes_per_node must be positive",
                ));
            }
        }
        Ok(())
    }
}

/// Pool names: 1–63 characters of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn check_pool_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "pool name {name:?} must be 1-63 characters of a-z, 0-9 and '-', starting and ending alphanumeric"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pools() {
        let cfg = Config::from_toml(
            "[[pool]]\nname = \"fast\"\nkind = \"dir\"\npath = \"/srv/fast\"\ndefault_size = \"2Gi\"\n",
        )
        .unwrap();
        assert_eq!(cfg.pools[0].name, "fast");
        assert_eq!(cfg.pools[0].default_size_bytes().unwrap(), 2 << 30);
    }

    #[test]
    fn parses_btrfs_pools() {
        let cfg = Config::from_toml(
            "[[pool]]\nname = \"sub\"\nkind = \"btrfs\"\npath = \"/srv/b\"\nquotas = \"require\"\novercommit = true\n",
        )
        .unwrap();
        assert_eq!(cfg.pools[0].kind, PoolKind::Btrfs);
        assert_eq!(cfg.pools[0].quotas, Some(QuotaPolicy::Require));
        assert_eq!(cfg.pools[0].overcommit, Some(true));
        let plain =
            Config::from_toml("[[pool]]\nname = \"b\"\nkind = \"btrfs\"\npath = \"/srv/b\"\n")
                .unwrap();
        assert_eq!(plain.pools[0].quotas, None);
        let err = Config::from_toml(
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv\"\nquotas = \"enable\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("btrfs pools only"), "{err}");
        assert!(Config::from_toml(
            "[[pool]]\nname = \"b\"\nkind = \"btrfs\"\npath = \"/srv\"\nquotas = \"maybe\"\n",
        )
        .is_err());
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            "",
            "[[pool]]\nname = \"Fast\"\nkind = \"dir\"\npath = \"/srv\"\n",
            "[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"rel\"\n",
            "[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"/srv/../etc\"\n",
            "[[pool]]\nname = \"a\"\nkind = \"nfs\"\npath = \"/srv\"\n",
            "[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"/srv\"\nextra = 1\n",
            "[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"/a\"\n[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"/b\"\n",
            "[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"/a\"\ndefault_size = \"lots\"\n",
            "[[pool]]\nname = \"a\"\nkind = \"dir\"\npath = \"/a\"\novercommit_ratio = 2.0\n",
            "[[pool]]\nname = \"a\"\nkind = \"image\"\npath = \"/a\"\novercommit_ratio = 0.5\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn parses_stats_of_dir_pools() {
        let cfg = Config::from_toml(
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv/d\"\n[pool.stats]\nmin_age = \"1m\"\nwalk_budget = \"500ms\"\n",
        )
        .unwrap();
        let stats = cfg.pools[0].stats.clone().unwrap();
        assert_eq!(stats.min_age().unwrap(), Duration::from_secs(60));
        assert_eq!(stats.walk_budget().unwrap(), Duration::from_millis(500));
        let defaults = StatsConfig::default();
        assert_eq!(defaults.min_age().unwrap(), DEFAULT_STATS_MIN_AGE);
        assert_eq!(defaults.walk_budget().unwrap(), DEFAULT_STATS_WALK_BUDGET);
        for bad in [
            "[[pool]]\nname = \"b\"\nkind = \"btrfs\"\npath = \"/srv\"\n[pool.stats]\nmin_age = \"1s\"\n",
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv\"\n[pool.stats]\nmin_age = \"2h\"\n",
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv\"\n[pool.stats]\nmin_age = \"61m\"\n",
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv\"\n[pool.stats]\nwalk_budget = \"1ms\"\n",
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv\"\n[pool.stats]\nwalk_budget = \"2\"\n",
            "[[pool]]\nname = \"d\"\nkind = \"dir\"\npath = \"/srv\"\n[pool.stats]\nbudget = \"2s\"\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "accepted {bad:?}");
        }
        for bad in ["", "s", "-1s", "1.5s", "10 s", "3h"] {
            assert!(parse_duration(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn parses_image_pools() {
        let cfg = Config::from_toml(
            "[[pool]]\nname = \"hard\"\nkind = \"image\"\npath = \"/srv/img\"\novercommit_ratio = 1.5\n",
        )
        .unwrap();
        assert_eq!(cfg.pools[0].kind, PoolKind::Image);
        assert_eq!(cfg.pools[0].overcommit_ratio, Some(1.5));
    }

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::embedded_default(Path::new("/var/lib/stowage"));
        cfg.check().unwrap();
        assert_eq!(
            cfg.pools[0].path,
            Path::new("/var/lib/stowage/pools/default")
        );
    }
}
