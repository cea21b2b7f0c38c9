//! Product search: a tantivy index over name, description and category, on disk at
//! `search.index_dir`, fed by a poller that follows `products.updated_at` (so every pod's
//! index sees every pod's writes within `search.refresh_ms`). Queries and index writes run
//! on the blocking pool, never on the async workers.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, BoostQuery, FuzzyTermQuery, Query, QueryParser, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, Value, STORED, STRING, TEXT};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};
use uuid::Uuid;

use super::error::ProductsError;
use super::model::Product;

/// Indexing buffer shared by the writer's threads; larger buffers mean fewer, larger
/// segments during a rebuild.
const WRITER_MEMORY_BYTES: usize = 256_000_000;
/// A query whose exact words find at least this many products is answered from those
/// alone; below it, typo and prefix matches widen the query. The choice does not depend
/// on the page asked for, so pages stay consistent.
const ENOUGH_EXACT_HITS: usize = 50;
/// Shorter words are matched exactly only: one edit away from "tv" is half the catalogue.
const MIN_FUZZY_CHARS: usize = 4;
const MIN_PREFIX_CHARS: usize = 2;
/// Names weigh more than descriptions.
const NAME_BOOST: f32 = 3.0;

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    name: Field,
    description: Field,
    category: Field,
}

/// How `upsert` treats one batch.
#[derive(Debug, Clone, Copy)]
pub struct IndexPass {
    /// The index was emptied before this pass began (a rebuild).
    pub fresh: bool,
    /// Commit after this batch.
    pub commit: bool,
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
        parser.set_field_boost(fields.name, NAME_BOOST);
        // Every word must match, as shoppers expect from a search box; an intersection is
        // also driven by its rarest word, so common words stay cheap.
        parser.set_conjunction_by_default();
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
        let (exact, _ignored_syntax_errors) = self.parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        // One pass answers both "enough exact hits?" and, when so, the page itself.
        let exact_hits = searcher
            .search(
                &exact,
                &TopDocs::with_limit(ENOUGH_EXACT_HITS.max(offset + limit)).order_by_score(),
            )
            .map_err(search_error)?;
        let top = if exact_hits.len() >= ENOUGH_EXACT_HITS {
            exact_hits.into_iter().skip(offset).take(limit).collect()
        } else {
            let widened = BooleanQuery::union(vec![exact, self.forgiving(query)]);
            searcher
                .search(
                    &widened,
                    &TopDocs::with_limit(limit)
                        .and_offset(offset)
                        .order_by_score(),
                )
                .map_err(search_error)?
        };
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

    /// Every word must still match, but each may match with one typo in a name, and the
    /// last one (still being typed) as the start of a name word. Typos and prefixes look at
    /// names only: expanding descriptions too costs far more than it finds.
    fn forgiving(&self, query: &str) -> Box<dyn Query> {
        let mut words = vec![];
        if let Ok(mut analyzer) = self.index.tokenizer_for_field(self.fields.name) {
            let mut stream = analyzer.token_stream(query);
            while stream.advance() {
                words.push(stream.token().text.clone());
            }
        }
        let (name, description) = (self.fields.name, self.fields.description);
        let boosted = |query: Box<dyn Query>| -> Box<dyn Query> {
            Box::new(BoostQuery::new(query, NAME_BOOST))
        };
        let last = words.len().saturating_sub(1);
        let per_word = words.iter().enumerate().map(|(i, word)| {
            let chars = word.chars().count();
            let in_name = Term::from_field_text(name, word);
            let mut either: Vec<Box<dyn Query>> = vec![
                boosted(Box::new(TermQuery::new(
                    in_name.clone(),
                    IndexRecordOption::WithFreqs,
                ))),
                Box::new(TermQuery::new(
                    Term::from_field_text(description, word),
                    IndexRecordOption::WithFreqs,
                )),
            ];
            if chars >= MIN_FUZZY_CHARS {
                either.push(boosted(Box::new(FuzzyTermQuery::new(
                    in_name.clone(),
                    1,
                    true,
                ))));
            }
            if i == last && chars >= MIN_PREFIX_CHARS {
                either.push(boosted(Box::new(FuzzyTermQuery::new_prefix(
                    in_name, 0, false,
                ))));
            }
            Box::new(BooleanQuery::union(either)) as Box<dyn Query>
        });
        Box::new(BooleanQuery::intersection(per_word.collect()))
    }

    /// Replaces the documents of `products` (`pass.fresh`: the index cannot hold them, as
    /// in a rebuild, so nothing is deleted first); with `pass.commit`, makes everything so
    /// far durable and searchable with `watermark` as the commit's payload (where the poller
    /// resumes after a restart). A rebuild commits rarely: each commit cuts a segment to
    /// merge, and every delete is applied to every segment. Blocking.
    pub fn upsert(
        &self,
        products: &[Product],
        watermark: DateTime<Utc>,
        pass: IndexPass,
    ) -> Result<(), ProductsError> {
        let fields = self.fields;
        self.write(|writer| {
            for product in products {
                let id = product.id.to_string();
                if !pass.fresh {
                    writer.delete_term(Term::from_field_text(fields.id, &id));
                }
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
            if pass.commit {
                let mut prepared = writer.prepare_commit().map_err(search_error)?;
                prepared.set_payload(&watermark.to_rfc3339());
                prepared.commit().map_err(search_error)?;
            }
            Ok(pass.commit)
        })
    }

    /// Merges every segment into one: after a rebuild, queries then walk one posting list
    /// per term instead of one per segment. Blocking (tens of seconds on millions).
    pub fn merge_all(&self) -> Result<(), ProductsError> {
        self.merged(|_| Ok(()))
    }

    /// Merges every segment into one, then runs `then` with the watermark of the merged
    /// commit while no writer is open and none can open, so the files on disk are exactly
    /// that commit's (what a snapshot copies). Blocking.
    pub fn merged<T>(
        &self,
        then: impl FnOnce(Option<DateTime<Utc>>) -> Result<T, ProductsError>,
    ) -> Result<T, ProductsError> {
        let mut guard = self.writer.lock().map_err(search_error)?;
        // Background merges first: merging segments they are replacing would fail.
        if let Some(writer) = guard.take() {
            writer.wait_merging_threads().map_err(search_error)?;
        }
        let segments = self.index.searchable_segment_ids().map_err(search_error)?;
        if segments.len() >= 2 {
            let mut writer: IndexWriter = self
                .index
                .writer(WRITER_MEMORY_BYTES)
                .map_err(search_error)?;
            writer.merge(&segments).wait().map_err(search_error)?;
            writer.wait_merging_threads().map_err(search_error)?;
        }
        self.reader.reload().map_err(search_error)?;
        then(self.watermark())
    }

    /// Empties the index (a full rebuild follows). Blocking.
    pub fn clear(&self) -> Result<(), ProductsError> {
        self.write(|writer| {
            writer.delete_all_documents().map_err(search_error)?;
            writer.commit().map_err(search_error)?;
            Ok(true)
        })
    }

    /// Runs `change` with this process's writer (opened on first use), then, when it
    /// committed, makes the result visible to searches.
    fn write(
        &self,
        change: impl FnOnce(&mut IndexWriter) -> Result<bool, ProductsError>,
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
        if change(writer)? {
            self.reader.reload().map_err(search_error)?;
        }
        Ok(())
    }

    /// Where the last commit left the poller: the newest `updated_at` indexed.
    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        parse_watermark(&self.index.load_metas().ok()?.payload?)
    }
}

/// A commit's payload: the watermark written by `upsert`.
pub fn parse_watermark(payload: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(payload)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
