//! Product search: a tantivy index over name, description and category, on disk at
//! `search.index_dir`, fed by a poller that follows `products.updated_at` (so every pod's
//! index sees every pod's writes within `search.refresh_ms`). Queries and index writes run
//! on the blocking pool, never on the async workers.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::QueryParser;
use tantivy::schema::{Field, Schema, Value, STORED, STRING, TEXT};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};
use uuid::Uuid;

use super::error::ProductsError;
use super::model::Product;

const WRITER_MEMORY_BYTES: usize = 50_000_000;

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    name: Field,
    description: Field,
    category: Field,
}

pub struct SearchIndex {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    parser: QueryParser,
    /// Only the indexer holds a writer (one per index directory, tantivy's own lock).
    writer: Mutex<Option<IndexWriter>>,
}

fn search_error(e: impl std::fmt::Display) -> ProductsError {
    ProductsError::Unavailable(format!("search index: {e}"))
}

impl SearchIndex {
    pub fn open(dir: &Path) -> Result<Self, ProductsError> {
        std::fs::create_dir_all(dir).map_err(search_error)?;
        let mut schema = Schema::builder();
        let fields = Fields {
            id: schema.add_text_field("id", STRING | STORED),
            name: schema.add_text_field("name", TEXT),
            description: schema.add_text_field("description", TEXT),
            category: schema.add_text_field("category", STRING),
        };
        let directory = MmapDirectory::open(dir).map_err(search_error)?;
        let index = Index::open_or_create(directory, schema.build()).map_err(search_error)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::OnCommitWithDelay)
            .try_into()
            .map_err(search_error)?;
        let mut parser = QueryParser::for_index(
            &index,
            vec![fields.name, fields.description, fields.category],
        );
        // Typos (one edit) and prefixes ("headph") still find the product; names weigh most.
        parser.set_field_fuzzy(fields.name, true, 1, true);
        parser.set_field_fuzzy(fields.description, true, 1, true);
        parser.set_field_boost(fields.name, 3.0);
        Ok(Self {
            index,
            reader,
            fields,
            parser,
            writer: Mutex::new(None),
        })
    }

    /// Ids of the best matches for `query`, skipping `offset`. Blocking: call it from the
    /// blocking pool.
    pub fn search(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Uuid>, ProductsError> {
        let (query, _ignored_syntax_errors) = self.parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        let top = searcher
            .search(
                &query,
                &TopDocs::with_limit(limit)
                    .and_offset(offset)
                    .order_by_score(),
            )
            .map_err(search_error)?;
        let mut ids = Vec::with_capacity(top.len());
        for (_score, address) in top {
            let document: TantivyDocument = searcher.doc(address).map_err(search_error)?;
            let id = document
                .get_first(self.fields.id)
                .and_then(|value| value.as_str())
                .and_then(|id| Uuid::try_parse(id).ok());
            ids.extend(id);
        }
        Ok(ids)
    }

    /// Replaces the documents of `products` and commits with `watermark` as the commit's
    /// payload (where the poller resumes after a restart). Blocking.
    pub fn upsert(
        &self,
        products: &[Product],
        watermark: DateTime<Utc>,
    ) -> Result<(), ProductsError> {
        let fields = self.fields;
        self.write(|writer| {
            for product in products {
                let id = product.id.to_string();
                writer.delete_term(Term::from_field_text(fields.id, &id));
                let category = product
                    .category_id
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                writer
                    .add_document(doc!(
                        fields.id => id,
                        fields.name => product.name.as_str(),
                        fields.description => product.description.as_str(),
                        fields.category => category,
                    ))
                    .map_err(search_error)?;
            }
            let mut commit = writer.prepare_commit().map_err(search_error)?;
            commit.set_payload(&watermark.to_rfc3339());
            commit.commit().map_err(search_error)?;
            Ok(())
        })
    }

    /// Empties the index (a full rebuild follows). Blocking.
    pub fn clear(&self) -> Result<(), ProductsError> {
        self.write(|writer| {
            writer.delete_all_documents().map_err(search_error)?;
            writer.commit().map_err(search_error)?;
            Ok(())
        })
    }

    /// Runs `change` with this process's writer (opened on first use), then makes the
    /// result visible to searches.
    fn write(
        &self,
        change: impl FnOnce(&mut IndexWriter) -> Result<(), ProductsError>,
    ) -> Result<(), ProductsError> {
        let mut guard = self.writer.lock().map_err(search_error)?;
        let writer = match guard.as_mut() {
            Some(writer) => writer,
            None => guard.insert(
                self.index
                    .writer(WRITER_MEMORY_BYTES)
                    .map_err(search_error)?,
            ),
        };
        change(writer)?;
        self.reader.reload().map_err(search_error)
    }

    /// Where the last commit left the poller: the newest `updated_at` indexed.
    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        let payload = self.index.load_metas().ok()?.payload?;
        DateTime::parse_from_rfc3339(&payload)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}
