"""A radsynth model folder, loaded by diffusers alone: ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` returns the pipeline the folder was saved from, without importing radsynth first.

``RadsynthPipeline.save_pretrained`` copies this file into every model folder as ``pipeline.py`` and names it in
``model_index.json`` (``"_class_name": ["pipeline", "<the pipeline class>"]``), diffusers' convention for a
pipeline whose code ships with its weights. radsynth must be installed: the file only imports it. radsynth's own
loaders never run the folder's copy (a folder is something a user can write): ``RadsynthPipeline.load_config``
reads the class name and ignores the file.
"""

from radsynth.pipelines.sampling.lesion_inpaint import RadsynthLesionInpaintPipeline
from radsynth.pipelines.sampling.mask_to_image import RadsynthMaskToImagePipeline
from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline
from radsynth.pipelines.sampling.text_to_pair import RadsynthTextToPairPipeline

__all__ = ["RadsynthLesionInpaintPipeline", "RadsynthMaskToImagePipeline", "RadsynthTextToImagePipeline",
           "RadsynthTextToPairPipeline"]
