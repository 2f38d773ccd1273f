//! placeholder
use super::StoreError;
/// placeholder
#[derive(Debug)]
pub struct FileBackend;
impl FileBackend {
    /// placeholder
    pub fn open(_d: &std::path::Path) -> Result<Self, StoreError> {
        Err(StoreError::Cleared)
    }
    /// placeholder
    pub fn default_dir() -> Option<std::path::PathBuf> {
        None
    }
}
impl super::Backend for FileBackend {
    fn is_blocking(&self) -> bool {
        true
    }
    fn get_token(&self, _: &str, _: &str) -> Result<Option<crate::token::Token>, StoreError> {
        Ok(None)
    }
    fn save_token(
        &self,
        _: &str,
        _: &str,
        _: &crate::token::Token,
        _: super::SaveMode,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_token(&self, _: &str, _: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    fn list_providers(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![])
    }
    fn list_buckets(&self, _: &str) -> Result<Vec<String>, StoreError> {
        Ok(vec![])
    }
    fn get_key(&self, _: &str) -> Result<Option<crate::secret::Secret>, StoreError> {
        Ok(None)
    }
    fn set_key(&self, _: &str, _: &crate::secret::Secret) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_key(&self, _: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    fn list_keys(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![])
    }
    fn clear(&self) {}
}
