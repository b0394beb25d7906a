//! shoal guest agent. The container API arrives with issue #3; nothing here yet.
