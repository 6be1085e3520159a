//! The pieces: devices, backends and objects, each data with a driver (or
//! type), properties, a command-line rendering and QMP arguments.

use serde_json::{Map, Value as Json};

use super::props::{keyval_with_head, Props, Syntax, Value};
use crate::Error;

fn json_arg(head_key: &str, head: &str, props: &Props) -> String {
    let mut map = Map::new();
    map.insert(head_key.to_owned(), Json::from(head));
    map.extend(props.to_json());
    Json::Object(map).to_string()
}

macro_rules! piece {
    ($(#[$doc:meta])* $name:ident, $head:ident, $head_key:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// What QEMU instantiates.
            pub $head: String,
            /// Its properties, in order (`id` among them).
            pub props: Props,
        }

        impl $name {
            /// With these properties added (in order).
            #[must_use]
            pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
                self.props.set(key, value);
                self
            }

            /// Sets a property.
            pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
                self.props.set(key, value);
            }

            /// Its `id` property.
            pub fn id(&self) -> Option<&str> {
                self.props.get_str("id")
            }

            /// The option argument in `syntax`.
            pub fn to_arg(&self, syntax: Syntax) -> Result<String, Error> {
                match syntax {
                    Syntax::KeyValue => keyval_with_head(&self.$head, &self.props),
                    Syntax::Json => Ok(json_arg($head_key, &self.$head, &self.props)),
                }
            }
        }
    };
}

piece!(
    /// A `-device` (and QMP `device_add`).
    Device, driver, "driver"
);
piece!(
    /// A `-netdev` backend (and QMP `netdev_add`).
    Netdev, kind, "type"
);
piece!(
    /// A `-object` (and QMP `object-add`).
    Object, qom_type, "qom-type"
);
piece!(
    /// A `-chardev` backend (and QMP `chardev-add`).
    Chardev, backend, "backend"
);

impl Device {
    /// A device of `driver` without properties.
    pub fn new(driver: impl Into<String>) -> Device {
        Device {
            driver: driver.into(),
            props: Props::new(),
        }
    }

    /// The arguments of QMP `device_add` for this device.
    pub fn qmp_arguments(&self) -> Json {
        let mut map = Map::new();
        map.insert("driver".into(), Json::from(self.driver.as_str()));
        map.extend(self.props.to_json());
        Json::Object(map)
    }
}

impl Netdev {
    /// A backend of `kind` (`tap`, `user`, ...) called `id`.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Netdev {
        Netdev {
            kind: kind.into(),
            props: Props::new().with("id", id.into()),
        }
    }

    /// The arguments of QMP `netdev_add` for this backend.
    pub fn qmp_arguments(&self) -> Json {
        let mut map = Map::new();
        map.insert("type".into(), Json::from(self.kind.as_str()));
        map.extend(self.props.to_json());
        Json::Object(map)
    }
}

impl Object {
    /// An object of `qom_type` called `id`.
    pub fn new(qom_type: impl Into<String>, id: impl Into<String>) -> Object {
        Object {
            qom_type: qom_type.into(),
            props: Props::new().with("id", id.into()),
        }
    }

    /// The arguments of QMP `object-add` for this object.
    pub fn qmp_arguments(&self) -> Json {
        let mut map = Map::new();
        map.insert("qom-type".into(), Json::from(self.qom_type.as_str()));
        map.extend(self.props.to_json());
        Json::Object(map)
    }
}

impl Chardev {
    /// A character backend of `backend` (`socket`, `spicevmc`, ...) called `id`.
    pub fn new(backend: impl Into<String>, id: impl Into<String>) -> Chardev {
        Chardev {
            backend: backend.into(),
            props: Props::new().with("id", id.into()),
        }
    }

    /// The arguments of QMP `chardev-add`: `{id, backend: {type, data}}`.
    pub fn qmp_arguments(&self) -> Json {
        let mut data = self.props.to_json();
        let id = data.remove("id").unwrap_or(Json::Null);
        serde_json::json!({
            "id": id,
            "backend": {"type": self.backend, "data": data},
        })
    }
}

/// A `-blockdev` node (and QMP `blockdev-add`): `driver`, `node-name`
/// and the driver's properties, nested ones as [`Value::Object`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blockdev {
    /// All properties, `driver` and `node-name` first.
    pub props: Props,
}

impl Blockdev {
    /// A node of `driver` called `node_name`.
    pub fn new(driver: &str, node_name: &str) -> Blockdev {
        Blockdev {
            props: Props::new()
                .with("driver", driver)
                .with("node-name", node_name),
        }
    }

    /// A raw-format node over a host file or block device.
    pub fn raw_file(node_name: &str, filename: &str) -> Blockdev {
        let driver = if filename.starts_with("/dev/") {
            "host_device"
        } else {
            "file"
        };
        Blockdev::new("raw", node_name).with(
            "file",
            Props::new()
                .with("driver", driver)
                .with("filename", filename),
        )
    }

    /// With a property set.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Blockdev {
        self.props.set(key, value);
        self
    }

    /// Its node name.
    pub fn node_name(&self) -> Option<&str> {
        self.props.get_str("node-name")
    }

    /// The option argument in `syntax`.
    pub fn to_arg(&self, syntax: Syntax) -> Result<String, Error> {
        match syntax {
            Syntax::KeyValue => self.props.to_keyval(),
            Syntax::Json => Ok(Json::Object(self.props.to_json()).to_string()),
        }
    }

    /// The arguments of QMP `blockdev-add`.
    pub fn qmp_arguments(&self) -> Json {
        Json::Object(self.props.to_json())
    }
}

/// A legacy `-drive` (backend and, with `if=` other than `none`, its
/// device in one option). Always `key=value`; it has no QMP twin — use
/// [`Blockdev`] for hot plug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// Its properties, in order (`file`, `format`, `if`, `id`, ...).
    pub props: Props,
}

impl Drive {
    /// A drive over `file`.
    pub fn new(file: &str) -> Drive {
        Drive {
            props: Props::new().with("file", file),
        }
    }

    /// With a property set.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Drive {
        self.props.set(key, value);
        self
    }

    /// Sets a property.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.props.set(key, value);
    }

    /// The option argument.
    pub fn to_arg(&self) -> Result<String, Error> {
        self.props.to_keyval()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_two_renderings() {
        let d = Device::new("virtio-blk-pci")
            .with("id", "d1")
            .with("drive", "disk,1")
            .with("bootindex", 1)
            .with("addr", "0x0c");
        assert_eq!(
            d.to_arg(Syntax::KeyValue).unwrap(),
            "virtio-blk-pci,id=d1,drive=disk,,1,bootindex=1,addr=0x0c"
        );
        let json: Json = serde_json::from_str(&d.to_arg(Syntax::Json).unwrap()).unwrap();
        assert_eq!(json, d.qmp_arguments());
        assert_eq!(json["bootindex"], 1);
        assert_eq!(d.id(), Some("d1"));
    }

    #[test]
    fn chardev_qmp_shape() {
        let c = Chardev::new("spicevmc", "ch0").with("name", "vdagent");
        assert_eq!(
            c.to_arg(Syntax::KeyValue).unwrap(),
            "spicevmc,id=ch0,name=vdagent"
        );
        assert_eq!(
            c.qmp_arguments(),
            serde_json::json!({"id": "ch0", "backend": {"type": "spicevmc", "data": {"name": "vdagent"}}})
        );
    }
}
