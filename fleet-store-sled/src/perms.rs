//! File permissions of the store: directories it creates are 0700, files 0600, and what sled
//! created inside a store (or a backup) is set to that when the store is opened, closed or
//! backed up. On platforms other than Unix these functions do nothing.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Mode of the store's files.
#[cfg(unix)]
const FILE_MODE: u32 = 0o600;
/// Mode of the store's directories.
#[cfg(unix)]
const DIR_MODE: u32 = 0o700;

/// Makes `options` create its file 0600 (before the umask, which can only remove bits).
pub(crate) fn private_file_mode(options: &mut OpenOptions) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    #[cfg(not(unix))]
    let _ = options;
}

/// Sets an open file to exactly 0600 unless it already is.
pub(crate) fn make_file_private(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if file.metadata()?.permissions().mode() & 0o7777 != FILE_MODE {
            file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        }
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// Creates directory `path` (and missing parents) 0700, and sets `path` itself to exactly 0700
/// (the umask may have removed owner bits).
pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    builder.create(path)?;
    set_mode(path, true)
}

/// Sets `path` to exactly 0700 (`dir`) or 0600 unless it already is; a path that vanished in
/// the meantime (sled removes old snapshots) is not an error.
pub(crate) fn set_mode(path: &Path, dir: bool) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if dir { DIR_MODE } else { FILE_MODE };
        let current = match std::fs::symlink_metadata(path) {
            Ok(m) => m.permissions().mode() & 0o7777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if current != mode {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, dir);
    Ok(())
}

/// Sets every directory below `root` to 0700 and every regular file to 0600 (symbolic links
/// and other special files are left alone: setting a mode follows a link, out of the store).
/// `root` itself is not changed. On failure, the path that could not be changed.
pub(crate) fn make_tree_private(root: &Path) -> Result<(), (PathBuf, io::Error)> {
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err((dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| (dir.clone(), e))?;
            let path = entry.path();
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err((path, e)),
            };
            if kind.is_dir() {
                set_mode(&path, true).map_err(|e| (path.clone(), e))?;
                dirs.push(path);
            } else if kind.is_file() {
                set_mode(&path, false).map_err(|e| (path, e))?;
            }
        }
    }
    Ok(())
}

/// fsyncs directory `dir`, making a rename in it durable (a no-op where directories cannot be
/// opened as files).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
