//! Named network namespaces, made the way iproute2 makes them (`ip netns add`): a bind mount of
//! a namespace file under `/run/netns`, so `ip netns exec NAME` works on them. Used for
//! workload namespaces, and by `meshd demo` and the tests for their "machines".

use super::NetConfig;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const RUN_DIR: &str = "/run/netns";

/// Serialises namespace creation in this process (the /run/netns mount setup is not atomic).
static CREATE: Mutex<()> = Mutex::new(());

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

/// Make /run/netns a shared mount point, as iproute2 does, so namespace mounts propagate to the
/// mount namespaces `ip netns exec` creates.
fn prepare_run_dir() -> io::Result<()> {
    std::fs::create_dir_all(RUN_DIR)?;
    let dir = cstr(Path::new(RUN_DIR))?;
    let none = CString::new("none").unwrap();
    let empty = CString::new("").unwrap();
    let mut bound = false;
    loop {
        // SAFETY: plain mount(2) calls with valid C strings.
        let rc = unsafe {
            libc::mount(
                empty.as_ptr(),
                dir.as_ptr(),
                none.as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) || bound {
            return Err(io::Error::new(
                e.kind(),
                format!("making {RUN_DIR} shared: {e}"),
            ));
        }
        // SAFETY: as above.
        check(
            unsafe {
                libc::mount(
                    dir.as_ptr(),
                    dir.as_ptr(),
                    none.as_ptr(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            },
            "bind-mounting /run/netns",
        )?;
        bound = true;
    }
}

/// A named network namespace. Dropping an owned one deletes it (after killing what runs in it).
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    owned: bool,
}

impl Netns {
    /// Create a namespace (fails if it exists). Needs root.
    pub fn create(name: &str) -> io::Result<Netns> {
        let _g = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        prepare_run_dir()?;
        let path = Path::new(RUN_DIR).join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        let target = cstr(&path)?;
        let made = std::thread::spawn(move || -> io::Result<()> {
            // SAFETY: unshare affects only this short-lived thread; the bind mount keeps the new
            // namespace alive after the thread exits.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNET), "unshare(CLONE_NEWNET)")?;
                let tid = libc::syscall(libc::SYS_gettid);
                let src = CString::new(format!("/proc/self/task/{tid}/ns/net")).unwrap();
                let none = CString::new("none").unwrap();
                check(
                    libc::mount(
                        src.as_ptr(),
                        target.as_ptr(),
                        none.as_ptr(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                    "bind-mounting the namespace",
                )
            }
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let ns = Netns {
            name: name.to_string(),
            path,
            owned: true,
        };
        // Bring loopback up: processes expect it.
        ns.run_async(|| async {
            let nl = NetConfig::new()?;
            let lo = nl.index("lo").await?;
            Ok(nl.set_up(lo).await?)
        })
        .map_err(|e| io::Error::other(format!("{e:#}")))?;
        Ok(ns)
    }

    /// An existing namespace, not deleted on drop.
    pub fn open(name: &str) -> io::Result<Netns> {
        let path = Path::new(RUN_DIR).join(name);
        File::open(&path)?;
        Ok(Netns {
            name: name.to_string(),
            path,
            owned: false,
        })
    }

    /// Names of the namespaces under /run/netns starting with `prefix`.
    pub fn list(prefix: &str) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(RUN_DIR) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        v.sort();
        v
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn open_fd(&self) -> io::Result<File> {
        File::open(&self.path)
    }

    /// Processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return Vec::new();
        };
        let (dev, ino) = (meta.dev(), meta.ino());
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| m.dev() == dev && m.ino() == ino)
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Kept after it is dropped (a workload's namespace outlives the call that made it).
    pub fn persist(mut self) -> Netns {
        self.owned = false;
        self
    }

    /// Kill every process in the namespace and remove it.
    pub fn delete(&self) -> io::Result<()> {
        for pid in self.pids() {
            // SAFETY: kill(2) on a pid we found in this namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.unlink()
    }

    /// Remove the name (like `ip netns del`): processes still in it keep the namespace alive.
    pub fn unlink(&self) -> io::Result<()> {
        let p = cstr(&self.path)?;
        // SAFETY: umount2/unlink of our own namespace file.
        unsafe {
            libc::umount2(p.as_ptr(), libc::MNT_DETACH);
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Run `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let file = self.open_fd()?;
        std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: setns on this dedicated thread only.
            check(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                "setns",
            )?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// Start a long-lived thread inside the namespace (a test server, say).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
        let file = self.open_fd()?;
        Ok(std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: setns on this dedicated thread only.
            check(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                "setns",
            )?;
            Ok(f())
        }))
    }

    /// Run an async closure on a current-thread runtime inside the namespace.
    pub fn run_async<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        self.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f())
        })?
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let fd: Option<RawFd> = self.open_fd().ok().map(|f| {
            let fd = f.as_raw_fd();
            std::mem::forget(f); // kept open for the child; closed on exec (O_CLOEXEC)
            fd
        });
        // SAFETY: only async-signal-safe calls (setns) between fork and exec.
        unsafe {
            c.pre_exec(move || {
                let fd =
                    fd.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "namespace is gone"))?;
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.delete();
        }
    }
}
